"""Bad inputs not covered beside the code they test: each ends in one line naming what is wrong.

The rest of the suite: config keys, types, layer, k >= width, undefined or reserved data set names and a
missing data file (test_workflow); unreadable, truncated, non-UTF-8 or malformed files, missing columns,
skipped rows, duplicated ids and unreachable hubs (test_data); a model without a chat template and an
unreachable model (test_models); a corrupted SAE and k >= width (test_sae); an SAE/head width mismatch
and a stale cache (test_reward); unfinished caches (test_activations); half-written checkpoints
(test_checkpoints).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sarm import activations as A
from sarm import models
from sarm.data import load_pairs
from sarm.errors import SarmError
from sarm.reward import train_head
from sarm.reward_model import RewardModel
from sarm.sae import prepare_sae


def test_nan_loss_stops_training_naming_the_epoch():
    feats = torch.rand(20, 4)
    feats[0, 0] = float("nan")
    with pytest.raises(SarmError, match=r"^reward head training: loss is nan at epoch 1; lower reward.lr$"):
        train_head(feats[:16], feats[16:], epochs=2, lr=0.1, batch_size=16)


def test_data_set_with_no_rows(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(SarmError, match=f"^dataset e: {path} has no rows$"):
        load_pairs("e", {"path": str(path), "format": "rewardbench"})


def test_enormous_response_is_truncated_and_reported(tiny_model_dir, tmp_path, caplog):
    import pandas as pd

    tokenizer = models.load_tokenizer(tiny_model_dir)
    backbone = models.load_truncated(tiny_model_dir, 1, torch.float32)
    pairs = pd.DataFrame(
        {"id": ["a"], "prompt": [[{"role": "user", "content": "Say a lot."}]], "chosen": ["word " * 5000], "rejected": ["No."]}
    )
    with caplog.at_level(logging.WARNING):
        info = A.cache_activations(backbone, tokenizer, pairs, tmp_path / "c", max_length=64, batch_size=2)
    assert info["n_truncated"] == 1
    assert "1 of 2 sequences were longer than max_length=64 and lost their start" in caplog.text


def test_tokenizer_without_pad_token_pads_with_eos_and_without_any_is_refused(tiny_model_dir, tmp_path):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    assert models.load_tokenizer(tmp_path / "nopad").pad_token == tokenizer.eos_token
    config_file = tmp_path / "nopad" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("pad_token", "eos_token", "unk_token"):
        config[key] = None
    config_file.write_text(json.dumps(config))
    with pytest.raises(SarmError, match="the tokenizer has no pad, eos or unk token to pad batches with"):
        models.load_tokenizer(tmp_path / "nopad")


def test_missing_reward_model_folder(tmp_path):
    with pytest.raises(SarmError, match=f"^{tmp_path} is not a reward model folder \\(no reward_model.json\\)$"):
        RewardModel.from_pretrained(tmp_path)


def test_pretrained_sae_of_another_width_is_refused(tmp_path):
    from sarm.sae import save_sae, train_sae

    save_sae(train_sae([torch.randn(64, 8)], 8, 16, 2, 64, batch_size=32), tmp_path / "sae")

    class Cache:
        hidden_size = 12

    settings = {"pretrained": {"path": str(tmp_path / "sae")}}
    message = (
        r"^config key sae.pretrained: the SAE \(no hook name\) reads 8-dim inputs, but the model's cached states are 12-dim$"
    )
    with pytest.raises(SarmError, match=message):
        prepare_sae(settings, Cache(), "cpu", 0, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_asked_for_on_a_machine_without_one():
    with pytest.raises(SarmError, match="^config key device: 'cuda' asked for, but torch sees no CUDA device on this machine$"):
        models.resolve_device("cuda")


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SarmError, match="holds only pickled \\(.bin\\) weights; convert them to safetensors first"):
        models.fetch_model({"path": str(folder)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_file_type(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("a,b\n")
    with pytest.raises(SarmError, match="unknown file type"):
        load_pairs("c", {"path": str(path), "format": "rewardbench"})


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "cpu0"])
def test_a_device_that_is_no_device_is_one_line(name):
    """`sarm score --device gpu` ended in a torch traceback."""
    with pytest.raises(SarmError, match=rf"^config key device: {name!r} is not a device \(auto, cpu, cuda or cuda:N\)$"):
        models.resolve_device(name)
