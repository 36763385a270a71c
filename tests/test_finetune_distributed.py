"""Fine-tuning in two real CPU processes (torchrun, gloo): data parallel and DeepSpeed ZeRO-3 against one process
with the same global batch, wandb from rank 0 only, and the process tree ending together (one rank dying, or
Snakemake killed).

Tolerance of the comparisons, `ATOL` = 2e-5 on every weight after 4 optimiser steps at lr 1e-3: AdamW moves a
weight by at most ~lr a step (m / sqrt(v) is bounded by 1 early on), so 4 steps move it by at most 4e-3, and the
run below moves some by ~7e-4. Two processes differ from one only in float32 rounding: the gradient of a global
batch is summed in another order (gloo all-reduce or ZeRO-3's reduce-scatter of buckets instead of accumulation
in one process) and the processes run their matrix products on other thread counts; a relative error of ~1e-7
in a gradient becomes ~1e-7 of an Adam step, except for weights whose gradient is near zero, where m / sqrt(v) is
ill-conditioned. ATOL is 0.5 % of the largest possible movement and 3 % of the observed one, so a run that lost a
process's gradients (each process alone on half the data, or one process alone) fails it; measured: 0 (DDP,
bitwise) and 5.4e-6 (ZeRO-3) for plain BT; with the `poe` length term the runs below train with, 6.2e-6 (DDP: its
beta's gradient sums the micro-batches in another order) and 1.5e-6 (ZeRO-3).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import MODEL_SPEC
from test_finetune import SETTINGS as ONE_PROCESS

from sarm.cluster import launch_command
from sarm.data import write_pairs
from sarm.errors import SarmError
from sarm.finetune import RANKS_FILE, _whole_batches, finetune_reward_model, processes, run_processes, write_job

SETTINGS = {**ONE_PROCESS, "cpu_processes": 2, "zero3": False}
# with the poe length term: its beta, a parameter of the wrapped model, is all-reduced (DDP) and sharded (ZeRO-3)
SPEC = {"features": "hidden", "mode": "finetune", "sae": None, "topk": None, "length_debias": "poe"}
ATOL = 2e-5
TRAIN_PAIRS = 8  # 2 epochs x 8 pairs / global batch 4 = 4 optimiser steps; 8 = 2 processes x 2 pairs x 2 batches


@pytest.fixture(scope="module")
def tables(hh_pairs, tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    write_pairs(hh_pairs.iloc[:TRAIN_PAIRS], root / "train.parquet")
    write_pairs(hh_pairs.iloc[8:12], root / "val.parquet")
    return root


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, hh_pairs, tmp_path_factory):
    """The reference: one process, gradient accumulation 2 filling the same global batch of 4."""
    out, _ = finetune_reward_model(
        SPEC,
        SETTINGS,
        tiny_model_dir,
        MODEL_SPEC,
        hh_pairs.iloc[:TRAIN_PAIRS],
        hh_pairs.iloc[8:12],
        tmp_path_factory.mktemp("one") / "rm",
        None,
        "cpu",
        seed=0,
    )
    return out


def _job(tmp_path, tables, tiny_model_dir, name="rm", spec=SPEC, **settings) -> Path:
    return write_job(
        tmp_path / f"{name}.job.json",
        spec=spec,
        settings={**SETTINGS, **settings},
        model_dir=tiny_model_dir,
        model_spec=MODEL_SPEC,
        train=tables / "train.parquet",
        val=tables / "val.parquet",
        out_dir=tmp_path / name,
        sae=None,
        device="cpu",
        seed=0,
    )


def _launch(job: Path, log: Path, **env) -> None:
    """What the rule's script does with cpu_processes: 2 (workflow/scripts/finetune_reward.py)."""
    command = launch_command("sarm.finetune", [str(job)], processes(SETTINGS, "cpu"))
    run_processes(command, log, {**os.environ, "OMP_NUM_THREADS": "1", **env})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    if not (folder / "backbone").exists():  # full_depth: a plain HF sequence-classifier folder
        weights = load_file(next(folder.glob("*.safetensors")))
        return {k.removeprefix("model."): v for k, v in weights.items()}
    weights = load_file(next((folder / "backbone").glob("*.safetensors")))
    return {**weights, "head": load_file(folder / "head.safetensors")["weight"]}


def _assert_same_training(two: Path, one: Path, tiny_model_dir: Path) -> None:
    a, b = _weights(two), _weights(one)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"largest difference to one process: {diff:.2e}")
    assert diff <= ATOL, f"two processes differ from one by {diff:.2e} (> {ATOL})"
    base = load_file(next(tiny_model_dir.glob("*.safetensors")))
    moved = max((b[k] - base[f"model.{k}"]).abs().max().item() for k in b if f"model.{k}" in base)
    assert moved > 20 * ATOL  # the comparison can tell a trained backbone from a wrong one
    betas = [json.loads((f / "reward_model.json").read_text())["training"].get("length_beta") for f in (two, one)]
    assert (betas[0] is None) == (betas[1] is None)
    if betas[0] is not None:  # the length term learned the same beta
        assert betas[0] != 0 and abs(betas[0] - betas[1]) <= ATOL, betas


def _assert_both_ranks_trained(folder: Path, train_ids: list[str]) -> dict:
    """Two ranks, each on its own half of every epoch's pairs: neither a lone process nor two processes that each
    trained on everything passes."""
    ranks = json.loads((folder / RANKS_FILE).read_text())
    assert ranks["world_size"] == 2 and ranks["backend"] == "gloo" and [r["rank"] for r in ranks["ranks"]] == [0, 1]
    per_epoch = len(train_ids) // 2
    for epoch in range(SETTINGS["epochs"]):
        seen = [r["pairs"][epoch * per_epoch : (epoch + 1) * per_epoch] for r in ranks["ranks"]]
        assert all(len(s) == per_epoch for s in seen)
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(train_ids)
    training = json.loads((folder / "reward_model.json").read_text())["training"]
    assert training["world_size"] == 2 and training["pairs_dropped"] == 0
    return ranks


def test_the_rule_trains_in_two_cpu_processes_as_one_process_with_accumulation_and_logs_once(
    one_process, tables, tiny_model_dir, shared_data, hh_pairs, tmp_path
):
    """Snakemake's finetune_reward with finetune.cpu_processes 2 (on the tables and model of `tables`): torchrun,
    2 processes x 2 pairs = the reference's 1 process x 2 pairs x 2 accumulation steps; WANDB_MODE offline: rank 0
    alone writes the job's one wandb run."""
    from test_workflow import snakemake, tiny_config

    from sarm.tracking import read_offline_run

    shutil.copytree(tiny_model_dir, tmp_path / "resources/models/tiny")
    shutil.copytree(tables, tmp_path / "resources/tables")
    config = tiny_config(tiny_model_dir, shared_data) | {
        "reward_models": {
            "dense": {"features": "hidden"},
            "ft": {"features": "hidden", "mode": "finetune", "length_debias": "poe"},
        },
        "rl": {"reward": "dense"},
        "finetune": {k: v for k, v in SETTINGS.items() if k != "zero3"},
    }
    started = time.monotonic()
    result = snakemake(
        tmp_path,
        config,
        "results/reward/ft",
        "--allowed-rules",
        "finetune_reward",
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
    )
    print(f"the rule in two processes: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--nproc_per_node 2 -m sarm.finetune" in (tmp_path / "logs/finetune_reward/ft.log").read_text()
    out = tmp_path / "results/reward/ft"
    _assert_both_ranks_trained(out, hh_pairs.id[:TRAIN_PAIRS].tolist())
    _assert_same_training(out, one_process, tiny_model_dir)
    assert (out / "history.csv").exists() and not list(tmp_path.glob("results/reward/ft.*"))  # no job file, checkpoints

    (run,) = (tmp_path / "wandb").glob("offline-run-*")  # one run, not one per process
    logged = read_offline_run(run)
    assert logged["job_type"] == "finetune_reward" and logged["name"] == "ft" and logged["group"] == "smoke"
    assert any("loss" in row for row in logged["history"]) and any("eval_accuracy" in row for row in logged["history"])


@pytest.mark.deepspeed
def test_zero3_in_two_cpu_processes_splits_the_weights_and_trains_as_one_process(
    one_process, tables, tiny_model_dir, hh_pairs, tmp_path
):
    """DeepSpeed ZeRO-3 on the project's own reward wrapper (no `config` of its own): each rank holds half the
    parameters, and the weights gathered at the end match the one-process run."""
    if subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode:
        pytest.fail('deepspeed is not installed: pip install -e ".[deepspeed]" (make setup does)')
    job = _job(tmp_path, tables, tiny_model_dir, zero3=True)
    started = time.monotonic()
    _launch(job, tmp_path / "train.log")
    print(f"ZeRO-3, two processes: {time.monotonic() - started:.0f} s")
    ranks = _assert_both_ranks_trained(tmp_path / "rm", hh_pairs.id[:TRAIN_PAIRS].tolist())
    total = ranks["ranks"][0]["parameters"]
    for rank in ranks["ranks"]:  # matrices split in two; only vectors under 10 x hidden stay whole
        assert rank["parameters"] == total and rank["local_parameters"] <= 0.55 * total
    assert sum(r["local_parameters"] for r in ranks["ranks"]) >= total
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["training"]["zero3"] is True
    _assert_same_training(tmp_path / "rm", one_process, tiny_model_dir)


def test_full_depth_trains_in_two_processes_as_in_one(tables, tiny_model_dir, hh_pairs, tmp_path):
    """The workers run the package's module (`python -m sarm.finetune` loads it a second time as `__main__`), so
    the classifier the full_depth kind builds is recognised there (its config, its save)."""
    spec = {"mode": "full_depth"}
    one, _ = finetune_reward_model(
        spec,
        SETTINGS,
        tiny_model_dir,
        MODEL_SPEC,
        hh_pairs.iloc[:TRAIN_PAIRS],
        hh_pairs.iloc[8:12],
        tmp_path / "one",
        None,
        "cpu",
        seed=0,
    )
    _launch(_job(tmp_path, tables, tiny_model_dir, spec=spec), tmp_path / "train.log")
    _assert_both_ranks_trained(tmp_path / "rm", hh_pairs.id[:TRAIN_PAIRS].tolist())
    _assert_same_training(tmp_path / "rm", one, tiny_model_dir)


def _job_processes(job: Path) -> list[int]:
    """Live processes whose command line names this job file (the launcher and its workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(job).encode() in cmdline and state != "Z":
                found.append(int(proc.name))
    return found


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_dying_rank_stops_the_other_and_leaves_no_model(tables, tiny_model_dir, tmp_path):
    """Rank 1 is SIGKILLed at the start of epoch 2 (rank 0 waits for it in an all-reduce): torchrun ends rank 0,
    the script's call raises one error, no process of the job is left and no model folder is written."""
    job = _job(tmp_path, tables, tiny_model_dir)
    with pytest.raises(SarmError, match="the training processes failed"):
        _launch(job, tmp_path / "train.log", SARM_KILL_AT="finetune-rank1:2")
    assert _wait_until(lambda: not _job_processes(job), 30), "a training process outlived the failed job"
    assert not (tmp_path / "rm").exists() and not (tmp_path / "rm.tmp").exists()
    assert "Signal 9" in (tmp_path / "train.log").read_text() or "SIGKILL" in (tmp_path / "train.log").read_text()
    assert [p.name for p in (tmp_path / "rm.checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]  # resumable


FAKE_SNAKEMAKE = """
import subprocess, sys
# Snakemake runs a rule's script as its child; this stands in for it and waits
subprocess.run([sys.executable, "-c", sys.argv[1]])
"""

SCRIPT = """
import json, os, sys
from sarm.cluster import launch_command
from sarm.finetune import die_with_parent, run_processes
die_with_parent()  # as workflow/scripts/finetune_reward.py does first
job = sys.argv[1]
run_processes(launch_command("sarm.finetune", [job], 2), job + ".log", {**os.environ, "OMP_NUM_THREADS": "1"})
"""


def test_killing_snakemake_ends_the_script_and_its_training_processes(tables, tiny_model_dir, tmp_path):
    """Issue 16: Snakemake SIGKILLed mid-training must not leave the script's process tree running (a later run
    would race it on the same checkpoint folder). The script dies with its parent (PDEATHSIG) and takes the
    launcher and its workers with it."""
    job = _job(tmp_path, tables, tiny_model_dir, epochs=100)  # would train for minutes
    script = SCRIPT.replace("sys.argv[1]", repr(str(job)))
    snakemake = subprocess.Popen([sys.executable, "-c", FAKE_SNAKEMAKE, script])
    try:
        assert _wait_until(lambda: len(_job_processes(job)) >= 3, 60), "torchrun and its 2 workers did not start"
        os.kill(snakemake.pid, signal.SIGKILL)
        snakemake.wait()
        assert _wait_until(lambda: not _job_processes(job), 60), f"orphans left: {_job_processes(job)}"
    finally:
        for pid in _job_processes(job):
            os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "rm").exists()


def test_several_processes_drop_the_pairs_that_would_be_repeated(hh_pairs):
    """2 processes x 2 pairs: of 11 pairs 8 train, 3 are dropped (the sampler would pad with repeated pairs)."""
    kept, dropped = _whole_batches(hh_pairs.iloc[:11], 2, 2)
    assert len(kept) == 8 and dropped == 3 and kept.id.tolist() == hh_pairs.id[:8].tolist()
    assert _whole_batches(hh_pairs.iloc[:11], 2, 1)[1] == 0  # one process keeps every pair
    with pytest.raises(SarmError, match="3 training pairs are fewer than one batch per process"):
        _whole_batches(hh_pairs.iloc[:3], 2, 2)
    assert processes(SETTINGS, "cpu") == 2 and processes({**SETTINGS, "gpus": 8}, "cuda") == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_auto_without_a_gpu_trains_on_the_cpu_though_sized_for_a_gpu(tables, tiny_model_dir, shared_data, tmp_path):
    """`device: auto` sizes fine-tuning for a GPU (gpu=1, little host memory); on a machine without one it runs on
    the CPU, where the GPU job's host memory is no budget to refuse it by (config/ablations.yaml on 2 CPU cores)."""
    from test_workflow import snakemake, tiny_config

    shutil.copytree(tiny_model_dir, tmp_path / "resources/models/tiny")
    shutil.copytree(tables, tmp_path / "resources/tables")
    config = tiny_config(tiny_model_dir, shared_data) | {
        "device": "auto",
        "reward_models": {"dense": {"features": "hidden"}, "ft": {"features": "hidden", "mode": "finetune"}},
        "rl": {"reward": "dense"},
        "finetune": {k: v for k, v in SETTINGS.items() if k not in ("zero3", "cpu_processes")},
    }
    result = snakemake(
        tmp_path,
        config,
        "results/reward/ft",
        "--allowed-rules",
        "finetune_reward",
        "--set-resources",
        "finetune_reward:mem_mb=10",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs/finetune_reward/ft.log").read_text()
    assert "sized for a GPU (config key device: auto) but running on the CPU" in log
    assert (tmp_path / "results/reward/ft/reward_model.json").exists()
