"""The tuned training modes (finetune, joint, full_depth) on the tiny Llama and real HH-RLHF pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sarm import activations, models
from sarm.errors import SarmError
from sarm.evaluate import score_text
from sarm.finetune import (
    PairCollator,
    PairDataset,
    check_fits,
    finetune_reward_model,
)
from sarm.reward_model import RewardModel, set_topk
from sarm.reward_model import load as load_reward_model
from sarm.sae import load_sae, random_sae

MODEL_SPEC = {"name": "tiny", "layer": 2, "dtype": "float32", "max_length": 96}
SETTINGS = {
    "epochs": 2,
    "lr": 1e-3,
    "head_lr": 1e-2,
    "global_batch_size": 4,
    "per_device_batch_size": 2,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "gradient_checkpointing": True,
    "dtype": "float32",
    "max_pairs": None,
    "gpus": 1,
    "eval_batch_size": 4,
}


def _spec(**given):
    return {"features": "sae", "mode": "finetune", "sae": "sequence", "topk": True, "recon_weight": 1.0, **given}


def test_collator_puts_chosen_then_rejected_right_padded(tiny_model_dir, hh_pairs):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    data = PairDataset(tokenizer, hh_pairs.iloc[:3], 96)
    batch = PairCollator(tokenizer.pad_token_id)([data[0], data[1], data[2]])
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(data[i]["chosen"]) for i in range(3)] + [len(data[i]["rejected"]) for i in range(3)]
    # the cached path tokenises the same way: the last real token is the chat template's end of turn
    encoded = activations.encode(tokenizer, hh_pairs.prompt[1], hh_pairs.chosen[1], 96)
    assert batch["input_ids"][1, : lengths[1]].tolist() == encoded.input_ids.tolist()


@pytest.fixture(scope="module")
def finetuned(tiny_model_dir, hh_pairs, trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetuned")
    sae = load_sae(trained[0] / "rm" / "sae")
    out, history = finetune_reward_model(
        _spec(),
        SETTINGS,
        tiny_model_dir,
        MODEL_SPEC,
        hh_pairs.iloc[:8],
        hh_pairs.iloc[8:],
        root / "rm",
        sae,
        "cpu",
    )
    return out, history, sae


def test_finetune_trains_the_backbone_and_head_and_keeps_the_sae(finetuned, tiny_model_dir):
    out, history, sae = finetuned
    config = json.loads((out / "reward_model.json").read_text())
    assert config["training"]["mode"] == "finetune" and config["base_model"]["path"] == "backbone"
    assert config["training"]["sequences_per_second"] > 0
    assert history["loss"].notna().any() and "eval_accuracy" in history.columns
    model = RewardModel.from_pretrained(out)
    assert model.weight.abs().sum() > 0  # the zero-initialised head moved
    tuned = load_file(next((out / "backbone").glob("*.safetensors")))
    base = models.load_truncated(tiny_model_dir, 2, torch.float32).state_dict()
    key = "layers.0.mlp.down_proj.weight"
    assert not torch.equal(tuned[key], base[key])  # layers 1..L trained
    assert torch.equal(model.sae.W_enc, sae.W_enc)  # the SAE did not


def test_finetuned_model_scores_text_with_its_own_backbone(finetuned, hh_pairs):
    out, _, _ = finetuned
    model = load_reward_model(out)
    scores = score_text(model, hh_pairs.iloc[8:], batch_size=3)
    assert list(scores.columns[-2:]) == ["score_chosen", "score_rejected"] and len(scores) == 4
    # one sequence at a time gives the same rewards as batches (padding never leaks into the reward)
    one = model.score([hh_pairs.prompt[8]], [hh_pairs.chosen[8]], batch_size=1)
    assert np.isclose(one[0], scores.score_chosen.iloc[0], atol=1e-4)


def test_joint_mode_trains_the_sae_and_topk_off_reads_signed_pre_activations(tiny_model_dir, hh_pairs, trained, tmp_path):
    sae = load_sae(trained[0] / "rm" / "sae")
    out, _ = finetune_reward_model(
        _spec(mode="joint", topk=False),
        {**SETTINGS, "epochs": 1},
        tiny_model_dir,
        MODEL_SPEC,
        hh_pairs.iloc[:8],
        hh_pairs.iloc[8:],
        tmp_path / "rm",
        sae,
        "cpu",
    )
    model = RewardModel.from_pretrained(out)
    assert model.config["topk"] is False and model.config["training"]["mode"] == "joint"
    assert not torch.equal(model.sae.W_enc, sae.W_enc)  # the SAE trained too
    x = torch.randn(5, 64)
    dense = model.features(x)
    # TopK off as the public code: every latent's signed pre-activation W_enc (x - b_pre) + b_enc, no ReLU
    pre_acts = (x - model.sae.b_dec) @ model.sae.W_enc + model.sae.b_enc
    if model.sae.cfg.rescale_acts_by_decoder_norm:  # latents measured against unit-norm decoder rows (sae-lens)
        pre_acts = pre_acts * model.sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(dense, pre_acts, atol=1e-5, rtol=1e-5)
    assert (dense < 0).any(1).all() and ((dense != 0).sum(1) == model.sae.cfg.d_sae).all()
    set_topk(model.sae, True)
    assert ((model.sae.encode(x) > 0).sum(1) <= model.sae.cfg.k).all()


def test_response_mask_covers_the_last_assistant_turn(tiny_model_dir, hh_pairs):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    data = PairDataset(tokenizer, hh_pairs.iloc[:2], 512)
    batch = PairCollator(tokenizer.pad_token_id)([data[0], data[1]])
    for row, (pair, side) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        ids = batch["input_ids"][row][batch["response_mask"][row].bool()].tolist()
        text = tokenizer.decode(ids)
        response = hh_pairs[side][pair]
        assert text.startswith(response[:20].strip()) and text.rstrip().endswith("<|im_end|>"), text[:80]
        assert ids[-1] == batch["input_ids"][row][batch["attention_mask"][row].sum() - 1]  # ends at the end of turn


def test_joint_reconstruction_is_the_public_recipes(tiny_model_dir, hh_pairs, trained):
    """sarm_train_mode=3 of the public code: the SAE reconstructs the detached standardised states of the last
    assistant turn; per-token normalised MSE, masked mean per sequence, then the batch mean; only the SAE learns."""
    from sarm.finetune import SarmForReward

    tokenizer = models.load_tokenizer(tiny_model_dir)
    data = PairDataset(tokenizer, hh_pairs.iloc[:3], 96)
    batch = PairCollator(tokenizer.pad_token_id)([data[i] for i in range(3)])
    sae = load_sae(trained[0] / "rm" / "sae")
    set_topk(sae, False)
    model = SarmForReward(
        models.load_truncated(tiny_model_dir, 2, torch.float32), sae.cfg.d_sae, sae, train_sae=True, recon_weight=1.0
    )
    hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    recon = model._reconstruction(hidden, batch["response_mask"], torch.float32)

    # the public code's Masked_Normalized_MSE_loss over [B, T]; TopK as sae-lens has it (the public TopK keeps a
    # negative value among the top k, sae-lens zeroes it: they differ only where fewer than k latents are positive)
    h = activations.standardize(hidden.detach())
    pre = (h - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.cfg.k, dim=-1)
    latents = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    h_hat = latents @ sae.W_dec + sae.b_dec
    loss = ((h_hat - h) ** 2).mean(-1) / (h**2).mean(-1)
    mask = batch["response_mask"].float()
    expected = ((mask * loss).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(recon, expected, atol=1e-5, rtol=1e-5)

    recon.backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())  # the states were detached


@pytest.fixture(scope="module")
def full_depth(tiny_model_dir, hh_pairs, tmp_path_factory):
    out, _ = finetune_reward_model(
        {"mode": "full_depth", "features": "hidden", "sae": None, "topk": None},
        {**SETTINGS, "epochs": 1},
        tiny_model_dir,
        MODEL_SPEC,
        hh_pairs.iloc[:8],
        hh_pairs.iloc[8:],
        tmp_path_factory.mktemp("full") / "rm",
        None,
        "cpu",
    )
    return out


def test_full_depth_classifier_is_a_standard_hf_folder(full_depth, hh_pairs):
    from transformers import AutoModelForSequenceClassification

    out = full_depth
    classifier = AutoModelForSequenceClassification.from_pretrained(out)
    assert classifier.config.num_hidden_layers == 4 and classifier.config.num_labels == 1
    scores = load_reward_model(out).score(hh_pairs.prompt[:2].tolist(), hh_pairs.chosen[:2].tolist())
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_an_outside_loader_scores_the_full_depth_classifier_at_its_end_of_turn_token(full_depth):
    """Plain transformers pools a sequence classifier at the last token whose id is not the config's pad_token_id;
    SmolLM2's pad is its end-of-turn `<|im_end|>`, so a saved pad id left as it was read the token before."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = AutoModelForSequenceClassification.from_pretrained(full_depth).eval()
    tokenizer = AutoTokenizer.from_pretrained(full_depth)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert classifier.config.pad_token_id == tokenizer.pad_token_id != end_of_turn
    prompts = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one, please?"},
        ],
        [{"role": "user", "content": "Hi"}],
    ]
    responses = ["4.", "Green, like grass in spring.", "Hello! How can I help you today?"]
    texts = [
        tokenizer.apply_chat_template([*p, {"role": "assistant", "content": r}], tokenize=False).rstrip()
        for p, r in zip(prompts, responses)
    ]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any() and (batch["input_ids"] == end_of_turn).any()
    with torch.no_grad():
        outside = classifier(**batch).logits[:, 0].numpy()
    ours = load_reward_model(full_depth).score(prompts, responses)
    np.testing.assert_allclose(outside, ours, rtol=1e-5, atol=1e-5)


def test_a_model_too_large_for_the_declared_memory_fails_before_training():
    from transformers import LlamaConfig

    from sarm.finetune import estimate_memory_mb, zero3_config

    # SARM-4B: Llama-3.1-8B's layers 1..16 (+ SAE) trained at 4 pairs x 4,096 tokens, checkpointed
    shape = LlamaConfig(hidden_size=4096, num_hidden_layers=16, num_attention_heads=32, intermediate_size=14336)
    alone = estimate_memory_mb(4_550_000_000, 4_015_000_000, 8, 4096, shape, True, on_gpu=True)
    sharded = estimate_memory_mb(4_550_000_000, 4_015_000_000, 8, 4096, shape, True, on_gpu=True, shards=8)
    with pytest.raises(SarmError, match=f"about {alone:,} MB on the GPU but 81,559 MB are declared"):
        check_fits(alone, 81_559, "GPU")  # one H100: AdamW states alone are 48 GB
    check_fits(sharded, 81_559, "GPU")  # ZeRO-3 over 8 of them fits
    assert sharded < alone - 60_000
    # the buckets transformers' "auto" would size from model.config (the reward wrappers have none): no "auto" left
    zero = zero3_config(shape.hidden_size)["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 4096**2 and zero["stage3_param_persistence_threshold"] == 40960
    check_fits(1_000, None, "host")  # nothing declared: nothing to check


def test_random_sae_is_sae_lens_init_and_reproducible():
    a, b = random_sae(64, 256, 8, seed=3), random_sae(64, 256, 8, seed=3)
    assert torch.equal(a.W_enc, b.W_enc) and a.cfg.k == 8
    assert not torch.equal(a.W_enc, random_sae(64, 256, 8, seed=4).W_enc)


def test_token_positions_draw_as_many_positions_as_sentence_ends(tiny_model_dir, hh_pairs):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    encoded = activations.encode(tokenizer, hh_pairs.prompt[0], hh_pairs.chosen[0], 96)
    drawn = activations.token_positions(encoded, seed=0)
    assert len(drawn.sentence_ends) == len(encoded.sentence_ends) > 0
    assert len(set(drawn.sentence_ends.tolist())) == len(drawn.sentence_ends)  # without replacement
    assert drawn.sentence_ends.max() < len(encoded.input_ids)
    assert not np.array_equal(drawn.sentence_ends, encoded.sentence_ends)


def test_a_job_file_runs_as_the_module_each_gpu_process_runs(tiny_model_dir, hh_pairs, tmp_path):
    """What `torchrun ... -m sarm.finetune job.json` runs in each process, here as one CPU process."""
    import subprocess
    import sys

    from sarm.cluster import launch_command
    from sarm.data import write_pairs
    from sarm.finetune import write_job

    write_pairs(hh_pairs.iloc[:4], tmp_path / "train.parquet")
    write_pairs(hh_pairs.iloc[8:10], tmp_path / "val.parquet")
    job = write_job(
        tmp_path / "job.json",
        spec=_spec(features="hidden", sae=None, topk=None),
        settings={**SETTINGS, "epochs": 1},
        model_dir=tiny_model_dir,
        model_spec=MODEL_SPEC,
        train=tmp_path / "train.parquet",
        val=tmp_path / "val.parquet",
        out_dir=tmp_path / "rm",
        sae=None,
        device="cpu",
        seed=0,
    )
    command = launch_command("sarm.finetune", [str(job)], 8)
    assert "torch.distributed.run" in command and command[-3:] == ["-m", "sarm.finetune", str(job)]
    subprocess.run([sys.executable, "-m", "sarm.finetune", str(job)], check=True, capture_output=True)
    assert (tmp_path / "rm" / "history.csv").exists()
    assert RewardModel.from_pretrained(tmp_path / "rm").config["features"] == "hidden"


def test_a_killed_finetuning_job_resumes_from_its_last_epoch(tiny_model_dir, hh_pairs, tmp_path):
    """SIGKILL at the start of epoch 2 leaves epoch 1's Trainer checkpoint; the re-run resumes there and ends
    with the weights of an uninterrupted run."""
    import os
    import subprocess
    import sys

    from sarm.data import write_pairs
    from sarm.finetune import write_job

    write_pairs(hh_pairs.iloc[:4], tmp_path / "train.parquet")
    write_pairs(hh_pairs.iloc[8:10], tmp_path / "val.parquet")

    def job(name):
        return write_job(
            tmp_path / f"{name}.json",
            spec=_spec(features="hidden", sae=None, topk=None),
            settings={**SETTINGS, "gradient_checkpointing": False},
            model_dir=tiny_model_dir,
            model_spec=MODEL_SPEC,
            train=tmp_path / "train.parquet",
            val=tmp_path / "val.parquet",
            out_dir=tmp_path / name,
            sae=None,
            device="cpu",
            seed=0,
        )

    run = [sys.executable, "-m", "sarm.finetune"]
    killed = subprocess.run([*run, str(job("resumed"))], env={**os.environ, "SARM_KILL_AT": "finetune:2"}, capture_output=True)
    assert killed.returncode == -9 and not (tmp_path / "resumed").exists()
    assert [p.name for p in (tmp_path / "resumed.checkpoints").glob("checkpoint-*")] == [
        "checkpoint-1"
    ]  # epoch 1: one step of 4 pairs
    subprocess.run([*run, str(job("resumed"))], check=True, capture_output=True)
    subprocess.run([*run, str(job("straight"))], check=True, capture_output=True)
    resumed, straight = RewardModel.from_pretrained(tmp_path / "resumed"), RewardModel.from_pretrained(tmp_path / "straight")
    assert resumed.config["training"]["resumed"] and not straight.config["training"]["resumed"]
    assert torch.equal(resumed.weight, straight.weight)
    assert not (tmp_path / "resumed.checkpoints").exists()  # removed once the model is saved


def test_gradient_accumulation_fills_the_global_batch_over_all_processes(tmp_path, monkeypatch):
    """Under torchrun each of the N processes sees WORLD_SIZE=N before any process group exists."""
    from sarm.finetune import training_arguments

    settings = {**SETTINGS, "global_batch_size": 512, "per_device_batch_size": 4}
    assert training_arguments(settings, tmp_path, 1000, 8, "cpu", 0).gradient_accumulation_steps == 16
    assert training_arguments(settings, tmp_path, 1000, 1, "cpu", 0).gradient_accumulation_steps == 128
