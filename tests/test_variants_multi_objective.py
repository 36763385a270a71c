"""`mode: multi_objective` (ArmoRM-style): per-objective heads and the prompt gate, trained on tiny-model caches of
real HH-RLHF helpful and harmless pairs; its saved format, its cached and text paths, its attributions, its config
checks and its place in the workflow."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from sarm import activations as A
from sarm import models
from sarm.ablations import comparisons
from sarm.align import score_candidates
from sarm.config import explain_reward_model
from sarm.data import load_pairs
from sarm.errors import SarmError
from sarm.evaluate import score_cached
from sarm.gated_reward_model import GatedRewardModel
from sarm.reward import train_head
from sarm.reward_model import load, load_feature_head
from sarm.rewardbench import summarize
from sarm.sae import load_sae
from sarm.tables import ablation_of
from sarm.variants import MultiObjective, spec_from_config, spec_from_dict, specs_from_config
from sarm.variants.multi_objective import train_gate

MODEL_SPEC = {"name": "tiny", "layer": 2, "dtype": "float32", "max_length": 96}
SETTINGS = {"epochs": 6, "lr": 0.01, "batch_size": 4, "weight_decay": 0.0}


@pytest.fixture(scope="module")
def caches(tiny_model_dir, hh_pairs, shared_data, trained, tmp_path_factory):
    """Train (6 helpful + 6 harmless pairs) and val (2 + 2) caches of the tiny model, categories as the default
    config labels them, and the tiny SARM fixture's SAE."""
    harmless, _ = load_pairs(
        "hh-harmless",
        {"path": str(shared_data / "hh-rlhf/harmless-base/test.jsonl.gz"), "format": "hh_rlhf", "max_pairs": 8},
    )
    helpful = hh_pairs.assign(category="helpful")
    harmless = harmless.assign(category="harmless")
    tables = {
        "train": pd.concat([helpful.iloc[:6], harmless.iloc[:6]], ignore_index=True),
        "val": pd.concat([helpful.iloc[6:8], harmless.iloc[6:8]], ignore_index=True),
    }
    root = tmp_path_factory.mktemp("multi-objective")
    tokenizer = models.load_tokenizer(tiny_model_dir)
    backbone = models.load_truncated(tiny_model_dir, 2, torch.float32)
    for name, pairs in tables.items():
        A.cache_activations(backbone, tokenizer, pairs, root / name, max_length=96, batch_size=4, meta={"dtype": "float32"})
    sae = load_sae(trained[0] / "rm" / "sae")
    return A.ActivationCache(root / "train"), A.ActivationCache(root / "val"), tables, sae, root


@pytest.fixture(scope="module")
def fitted(caches, tiny_model_dir):
    train, val, _, sae, root = caches
    spec = spec_from_config("mo", {"mode": "multi_objective"})
    model, history = spec.fit_cached(train, val, tiny_model_dir, MODEL_SPEC, SETTINGS, sae, seed=0)
    folder = model.save_pretrained(root / "mo")
    return model, history, folder


def test_one_head_per_category_each_fitted_on_its_pairs_only(fitted, caches):
    model, history, _ = fitted
    train, val, _, sae, _ = caches
    assert model.objectives == ["harmless", "helpful"]  # null objectives: the training pairs' categories, sorted
    record = model.config["multi_objective"]["objectives"]
    assert {name: (r["categories"], r["n_train_pairs"], r["n_val_pairs"]) for name, r in record.items()} == {
        "harmless": (["harmless"], 6, 2),
        "helpful": (["helpful"], 6, 2),
    }
    # the helpful head is the frozen head's training on the helpful pairs alone (rows 0..11 of train, 0..3 of val)
    z_train, z_val = model.features(train.final(), sparse=True), model.features(val.final(), sparse=True)
    weight, _ = train_head(z_train[torch.arange(12)], z_val[torch.arange(4)], **SETTINGS)
    torch.testing.assert_close(model.heads[1], weight, atol=0, rtol=0)
    assert not torch.equal(model.heads[0], model.heads[1])
    assert list(history.stage.unique()) == ["objective", "gate"] and len(history) == 3 * SETTINGS["epochs"]
    gate = history[history.stage == "gate"].reset_index(drop=True)
    best = gate.sort_values(["val_accuracy", "val_loss"], ascending=[False, True], kind="stable").iloc[0]
    assert model.config["training"]["selected_epoch"] == best["epoch"]


def test_length_debias_trains_every_head_and_the_gate_with_its_length_term(fitted, caches, tiny_model_dir):
    train, val, _, sae, _ = caches
    spec = spec_from_config("mo-poe", {"mode": "multi_objective", "length_debias": "poe"})
    model, history = spec.fit_cached(train, val, tiny_model_dir, MODEL_SPEC, SETTINGS, sae, seed=0)
    record = model.config["multi_objective"]["objectives"]
    assert all(r["length_debias"] == "poe" and r["length_beta"] != 0 for r in record.values())
    assert model.config["training"]["length_debias"] == "poe" and "length_beta" in model.config["training"]  # the gate's
    assert history["length_beta"].notna().all()
    assert not torch.equal(model.heads, fitted[0].heads)  # the length term changed what the heads learned


def test_the_gate_mixes_the_objectives_per_prompt_and_the_parts_add_up(fitted, caches):
    model, _, _ = fitted
    train, *_ = caches
    rewards, details = model.score_cache(train)
    gate = np.stack([details["gate_harmless"], details["gate_helpful"]], 1)
    scores = np.stack([details["objective_harmless"], details["objective_helpful"]], 1)
    np.testing.assert_allclose(gate.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose((gate * scores).sum(1), rewards.numpy(), atol=1e-6)
    assert model.gate_weight.abs().max() > 0 and gate[:, 0].std() > 0  # trained: the mix depends on the prompt
    with pytest.raises(SarmError, match="needs the prompt's state as well"):
        model.score_hidden(train.final())


def test_a_trained_gate_routes_each_prompt_to_the_objective_that_ranks_its_pairs():
    """Synthetic: objective 0 ranks the pairs whose prompt has feature 2 > 0 right and the others wrong, objective 1
    the reverse; a uniform mix is at chance, the trained gate ranks (almost) all."""
    g = torch.Generator().manual_seed(0)
    n, width = 200, 8
    kind = torch.arange(n) % 2  # the prompt's type
    prompt = torch.randn(n, width, generator=g) * 0.1
    prompt[:, 2] = torch.where(kind == 0, 1.0, -1.0)
    response = torch.randn(2 * n, width, generator=g) * 0.1
    sign = torch.where(kind == 0, 1.0, -1.0)
    response[0::2, 0] += sign  # chosen: higher on feature 0 where objective 0 is right...
    response[1::2, 0] -= sign
    response[0::2, 1] -= sign  # ... and lower on feature 1 (objective 1 says the opposite)
    response[1::2, 1] += sign
    prompts = prompt.repeat_interleave(2, 0)
    config = {
        "features": "hidden",
        "hidden_size": width,
        "multi_objective": {"objectives": {"a": {}, "b": {}}, "gate_temperature": 1.0},
    }
    tensors = {"heads": torch.eye(2, width), "gate.weight": torch.zeros(2, width), "gate.bias": torch.zeros(2)}
    model = GatedRewardModel(config, tensors)
    before = model.score_states(response, prompts)[0]
    assert (before[0::2] > before[1::2]).float().mean() < 0.7
    cut = 2 * 160
    features = {"train": response[:cut], "val": response[cut:]}
    history = train_gate(
        model, features, {"train": prompts[:cut], "val": prompts[cut:]}, {**SETTINGS, "epochs": 20, "batch_size": 16}
    )
    after, _, gate = model.score_states(response, prompts)
    assert (after[0::2] > after[1::2]).float().mean() > 0.95 and history["val_accuracy"].max() > 0.95
    assert gate[0::4, 0].mean() > 0.8 and gate[2::4, 1].mean() > 0.8  # type 0 prompts lean on objective a


def test_the_saved_model_round_trips_and_is_no_linear_head(fitted, caches):
    model, _, folder = fitted
    _, val, *_ = caches
    saved = json.loads((folder / "reward_model.json").read_text())
    assert saved["format"] == "sarm-multi-objective" and (folder / "sae").is_dir()
    loaded = load(folder)
    assert isinstance(loaded, GatedRewardModel) and loaded.config == model.config
    (a, a_details), (b, b_details) = loaded.score_cache(val), model.score_cache(val)
    assert torch.equal(a, b) and a.abs().max() > 0
    assert all(np.array_equal(a_details[k], b_details[k]) for k in b_details)
    with pytest.raises(SarmError, match="a multi-objective reward is a prompt-gated mix of heads, not a sum over features"):
        load_feature_head(folder)


def test_evaluation_keeps_each_objective_and_the_gate_per_example(fitted, caches):
    _, _, folder = fitted
    _, val, tables, *_ = caches
    model = load(folder)
    scores = score_cached(model, val, tables["val"])
    expected = [
        f"{kind}_{name}_{side}" for kind in ("objective", "gate") for name in model.objectives for side in ("chosen", "rejected")
    ]
    assert list(scores.columns[-len(expected) :]) == expected
    rewards, _ = model.score_cache(val)
    np.testing.assert_array_equal(scores.score_chosen, rewards[0::2].numpy().astype(float))
    mixed = sum(scores[f"gate_{n}_rejected"] * scores[f"objective_{n}_rejected"] for n in model.objectives)
    np.testing.assert_allclose(mixed, scores.score_rejected, atol=1e-6)
    summary = summarize(scores, "mo")  # the extra columns are ignored
    assert summary["n_pairs"] == 4 and 0 <= summary["accuracy"] <= 1


def test_the_text_path_scores_as_the_cached_path(fitted, caches):
    _, _, folder = fitted
    _, val, tables, *_ = caches
    model, pairs = load(folder), tables["val"]
    cached = score_cached(model, val, pairs)
    chosen = model.score(list(pairs.prompt), list(pairs.chosen), batch_size=3)
    rejected = model.score(list(pairs.prompt), list(pairs.rejected), batch_size=1)
    np.testing.assert_allclose(chosen, cached.score_chosen, atol=1e-4, rtol=0)
    np.testing.assert_allclose(rejected, cached.score_rejected, atol=1e-4, rtol=0)
    with pytest.raises(SarmError, match="score \\(prompt, response\\) pairs"):
        model.score_texts(["<|im_start|>user\nHi<|im_end|>"])


def test_the_server_scores_prompt_response_pairs_and_refuses_rendered_texts(fitted, caches):
    from test_serve import post, start

    from sarm.reward_model import load_base_head

    _, _, folder = fitted
    *_, tables, _, _ = caches
    model, pairs = load_base_head(folder), tables["val"]
    server, url = start(model, max_batch=4, max_wait_ms=2)
    try:
        prompts, responses = list(pairs.prompt), list(pairs.chosen)
        status, out = post(url, {"prompts": prompts, "responses": responses})
        assert status == 200
        np.testing.assert_allclose(out["rewards"], model.score(prompts, responses), atol=1e-5, rtol=0)
        for body, message in (
            ({"query": ["<|im_start|>user\nHi<|im_end|>"]}, "needs the prompt located"),
            ({"prompts": prompts[:1], "responses": responses[:1], "token_rewards": True}, "gives no per-token rewards"),
        ):
            status, out = post(url, body)
            assert status == 400 and message in out["error"]
    finally:
        server.shutdown()
        server.server_close()
        server.service.close()


def test_best_of_n_scores_it_from_the_candidates_cache(fitted, caches, tiny_model_dir, tmp_path):
    _, _, folder = fitted
    *_, tables, _, _ = caches
    pairs = tables["val"]
    candidates = pd.DataFrame(
        [
            {"id": pair.id, "candidate": c, "prompt": pair.prompt, "response": response, "win_prob": 0.5, "n_chars": 1}
            for pair in pairs.itertuples()
            for c, response in enumerate((pair.chosen, pair.rejected))
        ]
    )
    tokenizer = models.load_tokenizer(tiny_model_dir)
    backbone = models.load_truncated(tiny_model_dir, 2, torch.float32)
    A.cache_sequences(backbone, tokenizer, candidates[["id", "candidate", "prompt", "response"]], tmp_path / "bon", 96, 4)
    model = load(folder)
    scores = score_candidates({"mo": model}, A.ActivationCache(tmp_path / "bon"), candidates)
    text = model.score(list(candidates.prompt), list(candidates.response))
    np.testing.assert_allclose(scores["mo"], text, atol=1e-4, rtol=0)


def test_attributions_split_one_reward_per_objective_and_feature(fitted, caches):
    model, _, _ = fitted
    _, val, *_ = caches
    final, prompt = val.final()[3], val.prompt_final()[3]
    table = model.attributions(final, prompt)
    reward, scores, gate = model.score_states(final[None], prompt[None])
    assert list(table.columns) == ["objective", "feature", "gate", "weight", "activation", "contribution"]
    assert table["contribution"].sum() == pytest.approx(float(reward[0]), abs=1e-5)
    for k, name in enumerate(model.objectives):
        part = table[table.objective == name]
        assert part["gate"].unique().tolist() == pytest.approx([float(gate[0, k])])
        assert part["contribution"].sum() / float(gate[0, k]) == pytest.approx(float(scores[0, k]), abs=1e-5)
        assert len(part) == int((model.features(final[None])[0] != 0).sum()) > 0  # the active latents
    magnitudes = table["contribution"].abs().to_numpy()
    assert (np.diff(magnitudes) <= 0).all() and magnitudes[0] > 0


def test_a_cache_written_before_prompt_states_is_one_line_saying_to_rerun_it(caches, tmp_path, tiny_model_dir):
    import shutil

    train, val, _, sae, root = caches
    old = tmp_path / "old"
    shutil.copytree(root / "val", old)
    meta = json.loads((old / "meta.json").read_text())
    for shard in sorted(old.glob("shard_*.safetensors")):
        tensors = {k: v for k, v in load_file(shard).items() if k != "prompt"}  # the format-1 shard
        save_file(tensors, shard)
        meta["shard_sha256"][shard.name] = A._sha256(shard.read_bytes())
    (old / "meta.json").write_text(json.dumps(meta))
    A.ActivationCache(old).final()  # its final states still read
    message = rf"^{old}: cached before its shards kept 'prompt' states \(cache format < 2\); re-run the rule that cached it$"
    with pytest.raises(SarmError, match=message):
        A.ActivationCache(old).prompt_final()
    spec = spec_from_config("mo", {"mode": "multi_objective"})
    with pytest.raises(SarmError, match=message):
        spec.fit_cached(train, A.ActivationCache(old), tiny_model_dir, MODEL_SPEC, SETTINGS, sae)


def test_objectives_name_their_categories(caches, tiny_model_dir):
    train, val, _, sae, _ = caches
    spec = spec_from_config(
        "mo", {"mode": "multi_objective", "objectives": {"all": ["helpful", "harmless"]}, "features": "hidden"}
    )
    model, _ = spec.fit_cached(train, val, tiny_model_dir, MODEL_SPEC, {**SETTINGS, "epochs": 2})
    assert model.objectives == ["all"] and model.sae is None and model.heads.shape == (1, 64)
    rewards, details = model.score_cache(val)
    np.testing.assert_allclose(details["gate_all"], 1.0)  # one objective: the gate has nothing to choose
    missing = spec_from_config("mo", {"mode": "multi_objective", "objectives": {"honest": ["honesty"]}})
    with pytest.raises(
        SarmError,
        match=r"^config key reward_models.mo.objectives.honest: no training pair has category 'honesty' "
        r"\(the training pairs' categories: harmless, helpful\)$",
    ):
        missing.fit_cached(train, val, tiny_model_dir, MODEL_SPEC, SETTINGS, sae)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"objectives": {}}, r"^config key reward_models.x.objectives: \{\} must map objective names to lists of categories"),
        ({"objectives": ["helpful"]}, r"^config key reward_models.x.objectives: \['helpful'\] must map objective names"),
        ({"objectives": {"a b": ["helpful"]}}, r"^config key reward_models.x.objectives: 'a b' is not an objective name"),
        (
            {"objectives": {"a": []}},
            r"^config key reward_models.x.objectives.a: \[\] must be a non-empty list of category names$",
        ),
        ({"objectives": {"a": "helpful"}}, r"^config key reward_models.x.objectives.a: 'helpful' must be a non-empty list"),
        ({"gate_temperature": 0}, r"^config key reward_models.x.gate_temperature: 0 must be a number > 0$"),
        ({"gate_temperature": True}, r"^config key reward_models.x.gate_temperature: True must be a number > 0$"),
        ({"features": "hidden", "topk": False}, r"^config key reward_models.x: sae and topk apply to features: sae only"),
        (
            {"m": 8},
            r"^config key reward_models.x: 'm' is not a key of mode multi_objective \(its keys: features, gate_temperature",
        ),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_key(given, message):
    with pytest.raises(SarmError, match=message) as err:
        spec_from_config("x", {"mode": "multi_objective", **given})
    assert "\n" not in str(err.value)


def test_the_kind_answers_what_the_workflow_asks(shared_data):
    specs = specs_from_config(
        {
            "reward_models": {
                "sarm": {},
                "mo": {"mode": "multi_objective", "objectives": {"h": ["helpful"]}, "gate_temperature": 0.5},
            }
        }
    )
    mo = specs["mo"]
    assert isinstance(mo, MultiObjective) and (mo.objectives, mo.gate_temperature) == ({"h": ["helpful"]}, 0.5)
    answers = (mo.trains_on_cache, mo.own_backbone, mo.scored_from_cache, mo.feature_head, mo.reads_sae)
    assert answers == (True, False, True, True, "sequence")
    assert not (mo.linear_head or mo.paper_head or mo.explainable or mo.contributions_per_feature)
    assert ablation_of(mo) is None and not [c for c in comparisons(specs) if "mo" in c]
    assert spec_from_dict("mo", mo.as_dict()) == mo
    with pytest.raises(SarmError, match=r"^config key explain.reward_model: 'mo' \(mode multi_objective\) has no linear head"):
        explain_reward_model({"explain": {"reward_model": "mo"}}, specs)
    from test_cluster import repo_config
    from test_variants import SHAPE

    from sarm.workflow import resources

    config = repo_config("config/paper/sarm-4b.yaml", shared_data) | {"resources_dir": "none", "device": "cuda"}
    config["reward_models"] = {"mo": {"mode": "multi_objective"}}
    assert resources.estimate("train_reward", config, SHAPE, rm="mo")["gpu"] == 0
    assert resources.estimate("evaluate", config, SHAPE, "val", specs_from_config(config)["mo"])["gpu"] == 0


def test_the_workflow_trains_evaluates_and_best_of_n_scores_it_but_never_explains_or_audits_it(
    tiny_model_dir, shared_data, tmp_path
):
    from test_variants_sparse_rm import _planned
    from test_workflow import snakemake, tiny_config

    config = tiny_config(tiny_model_dir, shared_data)
    objectives = {"helpful": ["helpful"], "harmless": ["harmless"]}  # the hh_rlhf format's categories
    config["reward_models"] = {"sarm": {}, "mo": {"mode": "multi_objective", "objectives": objectives, "gate_temperature": 0.5}}
    result = snakemake(tmp_path / "all", config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _planned(result.stdout)
    assert [w for rule, w, _ in jobs if rule == "train_reward" and w["rm"] == "mo"]
    assert {w["table"] for rule, w, _ in jobs if rule == "evaluate" and w["rm"] == "mo"} == {"val", "rb-like"}
    (bon,) = [inputs for rule, _, inputs in jobs if rule == "bon_scores"]
    assert "results/reward/mo" in bon
    assert {rule for rule, _, inputs in jobs if "results/reward/mo" in inputs} == {"evaluate", "bon_scores"}
    assert "explain/mo" not in result.stdout and "shift/mo" not in result.stdout


def test_a_damaged_folder_is_one_line_naming_what_is_wrong(fitted, tmp_path):
    import shutil

    _, _, folder = fitted
    copy = tmp_path / "mo"
    shutil.copytree(folder, copy)
    tensors = load_file(copy / "head.safetensors")
    save_file({**tensors, "gate.bias": torch.zeros(3)}, copy / "head.safetensors")
    with pytest.raises(SarmError, match=r"^multi-objective reward model: gate.bias has shape \(3,\), not \(2,\) \(2 objectives"):
        load(copy)
    save_file({k: v for k, v in tensors.items() if k != "heads"}, copy / "head.safetensors")
    with pytest.raises(SarmError, match=r"head.safetensors: corrupt or truncated \(KeyError: .*'heads'"):
        load(copy)
