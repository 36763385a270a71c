"""Running at scale without a cluster: the SLURM profile's dry runs, the resources each job asks for (the
embedded default and the 8B paper config), the sbatch line the SLURM plugin builds, placeholders left in the
profile, retries with more time, multi-GPU launch commands, and wandb offline runs of a training rule."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_workflow import REPO, SECRET, snakemake, tiny_config

from sarm import cluster
from sarm.tracking import read_offline_run
from sarm.workflow import resources

SLURM = ["--workflow-profile", str(REPO / "profiles/slurm")]


def repo_config(name: str, shared_data: Path) -> dict:
    """A config of the repository, with its ../shared/data paths made absolute (tests run elsewhere)."""

    def fix(value):
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str) and value.startswith("../shared/data"):
            return str(shared_data / value.removeprefix("../shared/data/"))
        return value

    return fix(yaml.safe_load((REPO / name).read_text()))


def planned_jobs(output: str) -> list[dict]:
    """(rule, wildcards, resources, local) of every job a Snakemake dry run prints."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        head = re.search(r"^(local)?rule (\w+):", block, re.M)
        if not head:
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))

        def pairs(text):
            return dict(kv.split("=", 1) for kv in text.split(", ")) if text else {}

        resources = {k: int(v) if v.isdigit() else v for k, v in pairs(fields.get("resources", "")).items()}
        jobs.append(
            {
                "rule": head.group(2),
                "local": bool(head.group(1)),
                "wildcards": pairs(fields.get("wildcards", "")),
                "resources": resources,
            }
        )
    return jobs


def job(jobs: list[dict], rule: str, **wildcards) -> dict:
    (found,) = [j for j in jobs if j["rule"] == rule and all(j["wildcards"].get(k) == v for k, v in wildcards.items())]
    return found["resources"]


@pytest.fixture(scope="module")
def paper_plan(shared_data, tmp_path_factory):
    result = snakemake(tmp_path_factory.mktemp("paper"), repo_config("config/paper/sarm-4b.yaml", shared_data), "-n", *SLURM)
    assert result.returncode == 0, result.stderr[-3000:]
    return planned_jobs(result.stdout + result.stderr)


@pytest.fixture(scope="module")
def default_plan(shared_data, tmp_path_factory):
    result = snakemake(tmp_path_factory.mktemp("default"), repo_config("config/config.yaml", shared_data), "-n", *SLURM)
    assert result.returncode == 0, result.stderr[-3000:]
    return planned_jobs(result.stdout + result.stderr)


def test_paper_config_asks_for_what_an_8b_model_at_layer_16_needs(paper_plan, shared_data):
    config = repo_config("config/paper/sarm-4b.yaml", shared_data)
    train = job(paper_plan, "cache_activations", table="train")
    # bf16 weights of embeddings + layers 1..16 (~4B parameters, 8 GB) reach host memory once while loading
    assert train["gpu"] == 1 and 12_000 <= train["mem_mb"] <= 20_000
    # ~73k pairs x 2 x 1,024 planned tokens x 2 x 4B FLOPs at 100 TFLOP/s, doubled: hours, not minutes
    assert 240 <= train["runtime"] <= 600
    assert job(paper_plan, "cache_activations", table="val")["runtime"] < train["runtime"] / 5
    # tuned models are scored from text: no evaluation set is cached
    assert not [j for j in paper_plan if j["rule"] == "cache_activations" and j["wildcards"]["table"] not in ("train", "val")]
    sae = job(paper_plan, "sae")
    assert sae["gpu"] == 1 and sae["mem_mb"] >= 10_000
    # the paper's SAE corpus: ~1B OpenWebText2 tokens, sized by the token budget (6x the training pairs' tokens)
    corpus = job(paper_plan, "cache_sae_corpus", positions="sentence")
    assert corpus["gpu"] == 1 and corpus["runtime"] > 4 * train["runtime"]
    assert not [j for j in paper_plan if j["rule"] == "cache_sae_corpus" and j["wildcards"]["positions"] != "sentence"]
    # the paper's fine-tuning of layers 1..16 + head: 8 GPUs of one node (finetune.gpus), each of the 8 processes
    # loads ~4B parameters in fp32 on the host before moving them to its GPU, 3 epochs of ~73k pairs: hours
    sarm, dense = job(paper_plan, "finetune_reward", rm="sarm"), job(paper_plan, "finetune_reward", rm="dense")
    assert sarm["gpu"] == dense["gpu"] == 8 and 8 * 20_000 <= sarm["mem_mb"] <= 8 * 30_000 and 120 <= sarm["runtime"] <= 24 * 60
    assert job(paper_plan, "evaluate", rm="sarm", table="reward-bench-2")["gpu"] == 1  # tuned: scored from text
    # the dry run asks exactly what sarm.cluster computes
    shape = cluster.model_shape(config)
    assert shape.source == "config key cluster.model_shape" and shape.loaded_b == pytest.approx(4.015)
    # a frozen SARM head of this size reads 65,536 dense latents of ~154k sequences: tens of GB, on the CPU
    frozen = config | {"resources_dir": "none", "reward_models": {"sarm": {"features": "sae"}, "dense": {"features": "hidden"}}}
    frozen_sarm = resources.estimate("train_reward", frozen, shape, rm="sarm")
    assert frozen_sarm["mem_mb"] >= 50_000 and frozen_sarm["gpu"] == 0
    assert resources.estimate("train_reward", frozen, shape, rm="dense")["mem_mb"] < frozen_sarm["mem_mb"] / 4
    assert sae["mem_mb"] == resources.estimate("sae", config | {"resources_dir": "none"}, shape)["mem_mb"]
    for rule in ("fetch_model", "fetch_dataset"):
        assert all("gpu" not in j["resources"] for j in paper_plan if j["rule"] == rule), rule
    assert all(j["resources"]["slurm_account"] == "CHANGE-ME" for j in paper_plan if j["rule"] == "sae")


LOCAL_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=Path(sys.argv[1]) / "Snakefile",
                      config_settings=ConfigSettings(configfiles=[Path(sys.argv[2])]), workdir=Path(sys.argv[3]))
    print(json.dumps(sorted(wf._workflow._localrules)))
"""


def test_fetch_rules_run_on_the_login_node(tmp_path):
    """Compute nodes often have no internet: the fetch rules are local rules, and only they."""
    config = REPO / "config/paper/sarm-4b.yaml"
    result = subprocess.run(
        [sys.executable, "-c", LOCAL_RULES, str(REPO), str(config), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == '["fetch_dataset", "fetch_model", "fetch_sae_corpus"]'


def test_default_config_stays_small_under_the_slurm_profile(default_plan, paper_plan):
    for rule, paper_rule, kwargs in [
        ("cache_activations", "cache_activations", {"table": "train"}),
        ("sae", "sae", {}),
        ("train_reward", "finetune_reward", {"rm": "sarm"}),  # the default's frozen head, the paper's fine-tuning
    ]:
        small, big = job(default_plan, rule, **kwargs), job(paper_plan, paper_rule, **kwargs)
        assert small["mem_mb"] <= 8000 and small["runtime"] <= 60, (rule, small)
        assert big["mem_mb"] > small["mem_mb"] and big["runtime"] > small["runtime"], rule
    assert job(default_plan, "cache_activations", table="train")["gpu"] == 1  # device: auto asks for one
    assert job(default_plan, "eval_table", table="rb-like")["mem_mb"] == 4000  # the profile's default


def test_default_local_profile_dry_run_and_cpu_config(shared_data, tmp_path):
    config = repo_config("config/config.yaml", shared_data) | {"device": "cpu"}
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    cache = job(jobs, "cache_activations", table="train")
    assert cache["gpu"] == 0 and cache["mem_mb"] <= 8000  # fits the 24 GiB, 2-core machine


def test_retried_job_asks_for_more_memory_and_time():
    config = yaml.safe_load((REPO / "config/paper/sarm-4b.yaml").read_text())
    config["resources_dir"] = "none"
    shape = cluster.model_shape(config)
    first, second = (resources.estimate("cache_activations", config, shape, "train", attempt=a) for a in (1, 2))
    assert second["runtime"] == 2 * first["runtime"] and second["mem_mb"] == 2 * first["mem_mb"]
    assert yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())["retries"] >= 1


def _sbatch_line(resources: dict, rule: str) -> tuple[str, SimpleNamespace]:
    """The plugin's own submit-string builder, fed a job's planned resources."""
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    fake = SimpleNamespace(resources=Resources(resources), threads=8, is_group=lambda: False)
    params = {
        "run_uuid": "uuid",
        "slurm_logfile": "log/%j.log",
        "comment_str": f"rule_{rule}",
        "account": " -A myacct",
        "partition": " -p gpu",
        "workdir": "/w",
    }
    return submit.get_submit_command(fake, params) + set_gres_string(fake), fake


def test_sbatch_line_of_the_sae_rule(paper_plan):
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    resources = job(paper_plan, "sae")
    line, fake = _sbatch_line(resources, "sae")
    assert f"--mem {resources['mem_mb']}" in line and f"-t {resources['runtime']}" in line
    assert "--gpus=1" in line and "--cpus-per-task=8" in line and "-A myacct" in line and "-p gpu" in line
    fake.resources["gpu_model"] = "a100"
    assert set_gres_string(fake) == " --gpus=a100:1"


def test_sbatch_line_of_the_fine_tuning_rule(paper_plan):
    """One node, finetune.gpus GPUs: the job then runs torchrun with 8 processes inside it."""
    resources = job(paper_plan, "finetune_reward", rm="sarm")
    line, _ = _sbatch_line(resources, "finetune_reward")
    assert "--gpus=8" in line and f"--mem {resources['mem_mb']}" in line and f"-t {resources['runtime']}" in line
    assert cluster.launch_command("sarm.finetune", ["job.json"], 8)[1:7] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
    ]


def test_profile_left_with_change_me_stops_before_submitting(tiny_model_dir, shared_data, tmp_path):
    """A real (not dry) run under the SLURM profile: the placeholder account stops it before any sbatch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.calls"
    for tool in ("sbatch", "squeue", "sacct", "sinfo", "scontrol", "sacctmgr", "sshare", "scancel"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >> {log}\nexit 1\n')
        (bin_dir / tool).chmod(0o755)
    config = tiny_config(tiny_model_dir, shared_data)
    workdir = tmp_path / "w"
    workdir.mkdir()
    env_path = f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *SLURM,
        "results/sae/tiny-L2/metrics.json",
        "--allowed-rules",
        "sae",
    ]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    for table in ("train", "val"):
        (workdir / f"results/activations/tiny-L2/{table}").mkdir(parents=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={"PATH": env_path, "HOME": str(tmp_path)})
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "profiles/slurm/config.yaml: slurm_account is still the placeholder 'CHANGE-ME' (rule sae)" in out
    assert not log.exists() or "sbatch" not in log.read_text()


@pytest.mark.parametrize(
    "processes, expected",
    [
        (1, [sys.executable, "-m", "sarm.finetune", "--config", "c.yaml"]),
        (
            4,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nnodes",
                "1",
                "--nproc_per_node",
                "4",
                "-m",
                "sarm.finetune",
                "--config",
                "c.yaml",
            ],
        ),
    ],
)
def test_launch_command(processes, expected):
    """torchrun for GPUs and CPU processes alike (`accelerate launch --cpu --num_processes 2` starts only one);
    --standalone picks a free rendezvous port, so two jobs on one node do not collide."""
    assert cluster.launch_command("sarm.finetune", ["--config", "c.yaml"], processes) == expected


def test_cpu_processes_share_the_threads_and_each_hold_a_model(shared_data):
    config = repo_config("config/paper/sarm-4b.yaml", shared_data) | {"resources_dir": "none", "device": "cpu"}
    shape = cluster.model_shape(config)
    one = resources.estimate(
        "finetune_reward",
        config | {"finetune": {**config["finetune"], "max_pairs": None, "cpu_processes": 1, "zero3": False}},
        shape,
        rm="sarm",
    )
    two = resources.estimate(
        "finetune_reward",
        config | {"finetune": {**config["finetune"], "max_pairs": None, "cpu_processes": 2, "zero3": False}},
        shape,
        rm="sarm",
    )
    assert two["gpu"] == one["gpu"] == 0 and two["runtime"] == one["runtime"]
    assert 1.9 * one["mem_mb"] <= two["mem_mb"] <= 2.1 * one["mem_mb"]


def test_wandb_offline_run_of_a_retried_training_rule(tiny_model_dir, shared_data, trained, tmp_path, monkeypatch):
    """WANDB_MODE=offline turns wandb on for the tiny config's dense head (the rule alone, on the `trained`
    fixture's caches); the job is killed once (SIGKILL at epoch 2) and retried: attempt 2 asks for twice the
    time and memory, resumes from its checkpoint, and logs to the same wandb run id; the run holds the rule's
    config keys and one metrics row per epoch."""
    config = tiny_config(tiny_model_dir, shared_data)
    root = trained[0]
    shutil.copytree(tiny_model_dir, tmp_path / "w/resources/models/tiny")
    for table in ("train", "val"):
        shutil.copytree(root / table, tmp_path / f"w/results/activations/tiny-L2/{table}")
    for key, value in {"WANDB_MODE": "offline", "SARM_KILL_AT": "head:2", "SARM_KILL_ONCE": str(tmp_path / "killed")}.items():
        monkeypatch.setenv(key, value)
    result = snakemake(tmp_path / "w", config, "results/reward/dense", "--retries", "1", "--allowed-rules", "train_reward")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert (tmp_path / "killed").exists()
    attempts = [j["resources"] for j in planned_jobs(out) if j["rule"] == "train_reward"]
    assert len(attempts) == 2, attempts
    assert attempts[1]["runtime"] == 2 * attempts[0]["runtime"] and attempts[1]["mem_mb"] == 2 * attempts[0]["mem_mb"]

    runs = [read_offline_run(f) for f in sorted((tmp_path / "w/wandb").glob("offline-run-*"))]
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]  # the retry resumed the killed attempt's run
    run = runs[-1]
    assert (run["group"], run["job_type"], run["name"]) == ("smoke", "train_reward", "dense")
    assert {"features", "epochs", "lr", "batch_size", "weight_decay", "experiment", "model_name", "layer"} <= set(run["config"])
    assert run["config"]["features"] == "hidden" and run["config"]["layer"] == 2 and run["config"]["epochs"] == 4
    rows = [row for row in run["history"] if "val_accuracy" in row]
    assert 1 <= len(rows) <= config["reward"]["epochs"] and all(0 <= row["val_accuracy"] <= 1 for row in rows)
    leaks = [p for p in (tmp_path / "w/wandb").rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_model_shape_from_config_json_counts_the_loaded_layers(tiny_model_dir):
    import torch

    from sarm import models

    shape = cluster.model_shape({"model": {"path": str(tiny_model_dir), "layer": 2}})
    loaded = sum(p.numel() for p in models.load_truncated(tiny_model_dir, 2, torch.float32).parameters())
    assert shape.loaded_b * 1e9 == pytest.approx(loaded, rel=0.01)  # norms are left out of the estimate
    assert shape.hidden_size == 64 and shape.num_hidden_layers == 4


def test_wandb_mode_from_the_environment_and_stable_run_ids(monkeypatch):
    from sarm.tracking import run_id, wandb_mode

    config = {"experiment": "e", "wandb": {"mode": "disabled"}}
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(config) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(config) == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older spelling
    assert wandb_mode(config) == "offline"
    first = run_id(config, "train_reward", "sarm", {"lr": 0.01})
    assert first == run_id(config, "train_reward", "sarm", {"lr": 0.01})  # a retry continues the run
    assert first != run_id(config, "train_reward", "sarm", {"lr": 0.02})  # a new setting starts another
    assert first != run_id(config | {"experiment": "f"}, "train_reward", "sarm", {"lr": 0.01})
    assert first != run_id(config, "train_reward", "dense", {"lr": 0.01})


def test_best_of_n_and_rl_jobs_are_sized_from_the_experiment(shared_data):
    default = repo_config("config/config.yaml", shared_data) | {"resources_dir": "none", "finetune": {"gpus": 1}}
    small = cluster.model_shape(
        default | {"cluster": {"model_shape": {"params_b": 0.135, "num_hidden_layers": 30, "hidden_size": 576}}}
    )
    big = cluster.model_shape(yaml.safe_load((REPO / "config/paper/sarm-4b.yaml").read_text()))
    for rule in ("cache_bon", "rl_train", "rl_evaluate"):
        table = "bon" if rule == "cache_bon" else None
        a, b = resources.estimate(rule, default, small, table), resources.estimate(rule, default, big, table)
        assert b["mem_mb"] > a["mem_mb"] and b["gpu_mem_mb"] > a["gpu_mem_mb"], rule
    # the default's RL run peaked at 5.8 GB on 2 CPU cores: a CPU job asks for more than that
    assert resources.estimate("rl_train", default | {"device": "cpu"}, small)["mem_mb"] >= 6000
    # best-of-N before its candidates table exists: 60 prompts x 16 planned candidates, two sequences a "pair"
    assert cluster.table_pairs(default, "bon") == 60 * 16 // 2


@pytest.mark.parametrize("name, size_b", [("sarm-4b", 4.3), ("sarm-3b", 2.7), ("sarm-2b", 2.0)])
def test_paper_configs_have_the_papers_sizes(name, size_b):
    """Table 1's sizes count embeddings + layers 1..L + the SAE encoder (SARM-4B: 4.0B + 0.27B): each config's
    layer gives its model's published size, counted on the real architectures (no weights loaded)."""
    from transformers import LlamaConfig, LlamaModel

    paper = yaml.safe_load((REPO / "config/paper/sarm-4b.yaml").read_text())
    own = yaml.safe_load((REPO / f"config/paper/{name}.yaml").read_text())
    layer, width = own["model"]["layer"], (own.get("sae") or {}).get("width") or paper["sae"]["width"]
    architectures = {  # the hub configs of Llama-3.1-8B-Instruct and Llama-3.2-3B-Instruct
        "meta-llama/Llama-3.1-8B-Instruct": dict(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False
        ),
        "meta-llama/Llama-3.2-3B-Instruct": dict(
            hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True
        ),
    }
    shape = architectures[own.get("model", {}).get("hub_id", paper["model"]["hub_id"])]
    with torch.device("meta"):
        backbone = LlamaModel(LlamaConfig(vocab_size=128256, num_hidden_layers=layer, **shape))
    size = sum(p.numel() for p in backbone.parameters()) + shape["hidden_size"] * width  # + the SAE encoder
    assert round(size / 1e9, 1) == size_b, (name, layer, size / 1e9)
