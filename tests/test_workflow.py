"""The real DAG on a tiny config: a random-init 4-layer model, a few dozen real pairs, a small SAE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tiny_model_dir: Path, shared_data: Path) -> dict:
    return {
        "experiment": "smoke",
        "device": "cpu",
        "model": {"name": "tiny", "path": str(tiny_model_dir), "layer": 2, "dtype": "float32", "max_length": 96, "batch_size": 8},
        "datasets": {
            "hh-helpful": {"path": str(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"), "format": "hh_rlhf", "max_pairs": 30},
            "hh-harmless": {"path": str(shared_data / "hh-rlhf/harmless-base/test.jsonl.gz"), "format": "hh_rlhf", "max_pairs": 30},
            "rb-like": {"path": str(shared_data / "rewardbench-like/rb_like_eval.jsonl.gz"), "format": "rewardbench"},
        },
        "train": {"datasets": ["hh-helpful", "hh-harmless"], "max_pairs": 48, "val_fraction": 0.25},
        "eval": {"datasets": ["rb-like"], "max_pairs_per_subset": 2},
        "sae": {"width": 256, "k": 8, "training_samples": 4096, "batch_size": 128},
        "reward": {"epochs": 4, "lr": 0.01, "batch_size": 8},
    }


def snakemake(workdir: Path, config: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke_run(tiny_model_dir, shared_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    result = snakemake(workdir, tiny_config(tiny_model_dir, shared_data))
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_whole_dag_writes_the_tables(smoke_run):
    tables = smoke_run / "results" / "tables"
    for table in ("val", "rb-like"):
        acc = pd.read_csv(tables / f"accuracy_{table}.csv")
        assert list(acc.columns) == ["category", "n", "sarm", "dense", "length"]
        assert acc["category"].iloc[-1] == "overall"
        assert acc[["sarm", "dense", "length"]].apply(lambda c: c.between(0, 100)).all().all()
    rb = pd.read_csv(tables / "accuracy_rb-like.csv").set_index("category")
    assert set(rb.index) == {"chat", "chat_hard", "safety", "reasoning", "overall"}
    assert rb.loc["reasoning", "n"] == 12  # six hep subsets, two pairs each
    sae = pd.read_csv(tables / "sae_metrics.csv")
    assert set(sae["heldout"]) == {"sentence", "final_token"} and (sae["l0"] == 8).all()
    assert (smoke_run / "results" / "figures" / "accuracy.png").stat().st_size > 10_000


def test_summaries_match_per_example_scores(smoke_run):
    scores = pd.read_parquet(smoke_run / "results/eval/sarm/val/scores.parquet")
    summary = json.loads((smoke_run / "results/eval/sarm/val/summary.json").read_text())
    assert summary["n_pairs"] == len(scores) == 12
    assert summary["accuracy"] == pytest.approx((scores.score_chosen > scores.score_rejected).mean())


def test_trained_reward_model_scores_raw_text_like_the_workflow(smoke_run):
    from sarm.data import read_pairs
    from sarm.reward import RewardModel

    model = RewardModel.from_pretrained(smoke_run / "results/reward/sarm")
    pairs = read_pairs(smoke_run / "resources/tables/val.parquet").head(3)
    scores = pd.read_parquet(smoke_run / "results/eval/sarm/val/scores.parquet").head(3)
    raw = model.score(list(pairs.prompt), list(pairs.chosen))
    assert raw == pytest.approx(scores.score_chosen.to_numpy(), abs=1e-4)


def test_second_run_has_nothing_to_do(smoke_run, tiny_model_dir, shared_data):
    result = snakemake(smoke_run, tiny_config(tiny_model_dir, shared_data), "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


# --- bad input: one clear line naming the key, file or row, and nothing partial left behind ---


def bad(tiny_model_dir, shared_data, **changes) -> dict:
    config = tiny_config(tiny_model_dir, shared_data)
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            config[section][key] = value
        else:
            config[section] = value
    return config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model__layr": 3}, "config key model: Additional properties are not allowed ('layr' was unexpected)"),
        ({"model__layer": "two"}, "config key model.layer: 'two' is not of type 'integer'"),
        ({"sae__k": 256}, "config key sae.k = 256 must be smaller than sae.width = 256"),
        ({"train__datasets": ["nope"]}, "config key train.datasets: 'nope' is not defined under datasets"),
        ({"reward__epochs": 0}, "config key reward.epochs: 0 is less than the minimum of 1"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(tiny_model_dir, shared_data, tmp_path, changes, message):
    result = snakemake(tmp_path, bad(tiny_model_dir, shared_data, **changes), "-n")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_layer_outside_the_model_fails_in_its_rule_and_leaves_nothing(tiny_model_dir, shared_data, tmp_path):
    config = bad(tiny_model_dir, shared_data, model__layer=9)
    result = snakemake(tmp_path, config, f"results/activations/tiny-L9/val")
    assert result.returncode != 0
    assert "config key model.layer = 9 is outside the model's layers (valid: 1..4)" in result.stderr
    assert not (tmp_path / "results/activations/tiny-L9/val").exists()


def test_missing_data_file_names_the_file(tiny_model_dir, shared_data, tmp_path):
    config = tiny_config(tiny_model_dir, shared_data)
    config["datasets"]["hh-helpful"]["path"] = str(tmp_path / "missing.jsonl.gz")
    result = snakemake(tmp_path, config, "resources/data/hh-helpful.parquet")
    assert result.returncode != 0 and str(tmp_path / "missing.jsonl.gz") in result.stderr
    assert not (tmp_path / "resources/data/hh-helpful.parquet").exists()
