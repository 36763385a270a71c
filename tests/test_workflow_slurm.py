"""The SLURM profile run for real: the tiny DAG through snakemake-executor-plugin-slurm on the one-node cluster
that tests/slurm/up.sh brings up on this machine (node with 2 CPUs and a fake GPU; `.ci/run` calls it first).

Only the site settings change: `--workflow-profile profiles/slurm` with its CHANGE-ME account and partitions
set to the local ones, `--max-threads 2` (the node has 2 CPUs; locally `--cores 2` caps the rules' threads the
same way) and faster status polling. Skipped, with the reason, when no SLURM cluster answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from miniature import TINY_OVERLAY, check_miniature_outputs, run_miniature, tiny_model_override
from test_workflow import REPO, snakemake, tiny_config

ACCOUNT, PARTITION = "sarm", "debug"  # what tests/slurm/up.sh creates
PROFILE = REPO / "profiles/slurm"
TARGET = "results/tables/accuracy_val.csv"  # rule tables: caching, the SAE, both heads, every evaluation
STARVED_MB = 300  # the SAE job's memory in the first run: SLURM kills it (Python + torch alone need more)


def slurm_unavailable() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return "SLURM is not installed (no sinfo/sacct): run tests/slurm/up.sh"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
        if nodes.returncode != 0:
            return f"slurmctld does not answer `sinfo` ({nodes.stderr.strip()}): run tests/slurm/up.sh"
        if not set(nodes.stdout.split()) & {"idle", "mix", "alloc"}:
            return f"no SLURM node is up (sinfo: {nodes.stdout.split()}): run tests/slurm/up.sh"
        accounting = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
        if accounting.returncode != 0:
            return f"slurmdbd does not answer `sacct` ({accounting.stderr.strip()}): run tests/slurm/up.sh"
    except subprocess.TimeoutExpired as err:
        return f"`{' '.join(err.cmd)}` hung: run tests/slurm/up.sh"
    return None


REASON = slurm_unavailable()
pytestmark = [pytest.mark.slurm, pytest.mark.paper_path, pytest.mark.skipif(REASON is not None, reason=str(REASON))]


def local_site(key: str, value):
    return {"slurm_account": ACCOUNT, "slurm_partition": PARTITION}.get(key, value) if value == "CHANGE-ME" else value


def slurm_args(*set_resources: str) -> list[str]:
    """The profile as it is, with its placeholders set to this cluster's account and partition (on the command
    line, --default-resources and --set-resources replace the profile's: so all of its entries are repeated)."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    defaults = [f"{k}={local_site(k, v)}" for k, v in profile["default-resources"].items()]
    sets = [f"{rule}:{k}={local_site(k, v)}" for rule, res in profile["set-resources"].items() for k, v in res.items()]
    return [
        "--workflow-profile",
        str(PROFILE),
        "--default-resources",
        *defaults,
        "--set-resources",
        *sets,
        *set_resources,
        "--max-threads",
        "2",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--seconds-between-status-checks",
        "1",
    ]


def run_slurm(workdir: Path, config: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """snakemake (the test_workflow helper); if it overruns, its SLURM jobs are cancelled, not left behind."""
    try:
        return snakemake(workdir, config, *args, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        for run_id in re.findall(r"SLURM run ID: (\S+)", out + str(err.stderr or "")):
            subprocess.run(["scancel", "--name", run_id], check=False)
        raise


def submitted(output: str) -> dict[str, dict]:
    """SLURM job id -> the job Snakemake submitted (rule, wildcards, threads, resources), from its output."""
    blocks = {}
    for m in re.finditer(r"^rule (\w+):\n((?:    .*\n)+)", output, re.M):
        fields = dict(re.findall(r"^    (\w+): (.*)$", m.group(2), re.M))
        resources = dict(kv.split("=", 1) for kv in fields.get("resources", "").split(", ") if "=" in kv)
        wildcards = [kv.split("=", 1)[1] for kv in fields["wildcards"].split(", ")] if "wildcards" in fields else []
        blocks[fields["jobid"]] = {
            "rule": m.group(1),
            "wildcards": wildcards,
            "threads": int(fields.get("threads", 1)),
            "resources": resources,
        }
    return {slurm: blocks[job] for job, slurm in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output)}


def sacct(*job_ids: str) -> dict[str, dict]:
    fields = ["JobID", "JobName", "Comment", "State", "ReqMem", "Timelimit", "ReqCPUS", "ReqTRES", "AllocTRES"]
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-j", ",".join(job_ids), f"--format={','.join(fields)}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {row[0]: dict(zip(fields, row)) for row in (line.split("|") for line in out.splitlines())}


def minutes(limit: int) -> str:
    return f"{limit // 60:02d}:{limit % 60:02d}:00"


def small_config(tiny_model_dir: Path, shared_data: Path) -> dict:
    """The tiny config without its RewardBench-like evaluation set: 10 SLURM jobs instead of 15 (each one
    also starts Snakemake on the node), with every kind of job still there."""
    config = tiny_config(tiny_model_dir, shared_data)
    return config | {"eval": {**config["eval"], "datasets": []}}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, shared_data, tmp_path_factory):
    """The tiny DAG (up to rule `tables`) three ways: on SLURM with the SAE starved of memory (SLURM kills it,
    the independent branches finish), then again with --rerun-incomplete; and locally (`--cores 2`, at the same
    time as the first, to share the waits). `length_baseline` asks for the node's (fake) GPU."""
    config = small_config(tiny_model_dir, shared_data)
    root = tmp_path_factory.mktemp("slurm")
    local = {}
    thread = threading.Thread(target=lambda: local.update(result=snakemake(root / "local", config, TARGET)))
    thread.start()
    first = run_slurm(
        root / "slurm", config, TARGET, *slurm_args(f"sae:mem_mb={STARVED_MB}", "length_baseline:gpu=1"), "--retries", "0"
    )
    thread.join()
    again = run_slurm(root / "slurm", config, TARGET, *slurm_args("length_baseline:gpu=1"), "--rerun-incomplete")
    return {"root": root, "first": first, "again": again, "local": local.get("result")}


def test_job_killed_by_slurm_names_its_log_and_reason_then_rerun_finishes(runs):
    first, again = runs["first"], runs["again"]
    out = first.stdout + first.stderr
    assert first.returncode != 0
    killed = [job for job, spec in submitted(out).items() if spec["rule"] == "sae"]
    assert len(killed) == 1, out[-3000:]
    (job,) = killed
    slurm_log = runs["root"] / f"slurm/.snakemake/slurm_logs/rule_sae/{job}.log"
    assert str(slurm_log) in out and slurm_log.exists()  # the plugin names the job's SLURM log
    assert "exceeded memory limit" in slurm_log.read_text()
    assert sacct(job)[job]["State"] in ("FAILED", "OUT_OF_MEMORY")
    # the plugin itself says only "SLURM status is: 'FAILED'. Reason: Unknown"; the workflow's onerror says why
    line = re.search(
        rf"SLURM job {job} \(rule sae\) was killed by SLURM over its memory \(peak (\d+) MB of the (\d+) MB asked\)"
        rf".*its SLURM log: (\S+)",
        out,
    )
    assert line, out[-3000:]
    assert int(line.group(1)) > int(line.group(2)) == STARVED_MB and line.group(3) == str(slurm_log)
    # keep-going: the branches that do not need the SAE finished on SLURM
    assert (runs["root"] / "slurm/results/eval/dense/val/summary.json").exists()
    assert "(Rule: sae)" not in out and "(Rule: tables)" not in out
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "sae" in {spec["rule"] for spec in submitted(again.stdout + again.stderr).values()}


def test_every_job_went_through_sbatch_and_slurm_recorded_what_it_asked(runs):
    jobs = {**submitted(runs["first"].stdout + runs["first"].stderr), **submitted(runs["again"].stdout + runs["again"].stderr)}
    rules = sorted(spec["rule"] for spec in jobs.values())
    # every job of the DAG but the fetches (local rules: the login node has the internet) ran as a SLURM job
    assert rules == sorted(
        [
            "train_tables",
            "cache_activations",
            "cache_activations",
            "sae",
            "sae",
            "train_reward",
            "train_reward",
            "evaluate",
            "evaluate",
            "length_baseline",
            "tables",
        ]
    )
    records = sacct(*jobs)
    assert set(records) == set(jobs)
    run_ids = set(re.findall(r"SLURM run ID: (\S+)", "".join(runs[k].stdout + runs[k].stderr for k in ("first", "again"))))
    for job, spec in jobs.items():
        record, asked = records[job], spec["resources"]
        starved = spec["rule"] == "sae" and asked["mem_mb"] == str(STARVED_MB)
        assert record["State"] == ("FAILED" if starved else "COMPLETED"), (spec, record)
        assert record["JobName"] in run_ids
        wildcards = "_".join(spec["wildcards"])
        assert record["Comment"] == f"rule_{spec['rule']}" + (f"_wildcards_{wildcards}" if wildcards else "")
        assert record["ReqMem"] == f"{asked['mem_mb']}M", (spec, record)
        assert record["Timelimit"] == minutes(int(asked["runtime"])), (spec, record)
        assert int(record["ReqCPUS"]) == spec["threads"], (spec, record)
        # device: cpu asks for no GPU; only the rule given gpu=1 got the node's (fake) one
        gpu = spec["rule"] == "length_baseline"
        assert ("gres/gpu=1" in record["ReqTRES"]) == gpu and ("gres/gpu=1" in record["AllocTRES"]) == gpu, (spec, record)
    # what the rules ask for reaches SLURM: the computed sizes (runtime_for), the rules' threads (capped at the
    # node's 2 CPUs), the profile's defaults (rules without resources)
    by_rule = {spec["rule"]: records[job] for job, spec in jobs.items()}
    assert by_rule["cache_activations"]["Timelimit"] == "00:15:00" and by_rule["cache_activations"]["ReqCPUS"] == "2"
    assert by_rule["tables"]["Timelimit"] == "00:30:00" and by_rule["tables"]["ReqMem"] == "4000M"
    assert by_rule["train_tables"]["ReqCPUS"] == "1"


TIMINGS = re.compile(r"seconds|per_second")  # how long a step took: activations' meta.json, the SAE's metrics.json


def comparable(path: Path, workdir: Path):
    """A result as compared between two runs: bytes, but JSON as data (sae-lens writes cfg.json's keys in any
    order), without timings and with the run's own folder (reward_model.json names its model folder) cut out."""
    if path.suffix != ".json":
        return path.read_bytes()

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not TIMINGS.search(k)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value.replace(str(workdir), "<workdir>") if isinstance(value, str) else value

    return strip(json.loads(path.read_text()))


def test_outputs_are_identical_to_a_local_run(runs):
    """Weights (SAE, heads, cached states), scores and tables byte for byte; JSON records equal but for timings."""
    local = runs["local"]
    assert local is not None, "the local run did not finish (see the captured stderr)"
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    slurm, here = runs["root"] / "slurm", runs["root"] / "local"

    def results(root):
        return sorted(
            p.relative_to(root) for p in (root / "results").rglob("*") if p.is_file() and p.name != ".snakemake_timestamp"
        )

    files = results(here)
    assert results(slurm) == files
    assert {str(p) for p in files} >= {
        "results/sae/tiny-L2/model/sae_weights.safetensors",
        "results/reward/sarm/head.safetensors",
        "results/reward/dense/head.safetensors",
        "results/eval/sarm/val/scores.parquet",
        "results/eval/dense/val/scores.parquet",
        "results/tables/accuracy_val.csv",
        "results/tables/sae_metrics.csv",
        "results/activations/tiny-L2/train/shard_00000.safetensors",
    }
    differ = [str(p) for p in files if comparable(slurm / p, slurm) != comparable(here / p, here)]
    assert differ == []
    assert sum(p.suffix != ".json" for p in files) >= 15
    acc = pd.read_csv(slurm / "results/tables/accuracy_val.csv")
    assert list(acc.columns) == ["category", "n", "sarm", "dense", "length"]


def small_run(tmp_path: Path, config: dict, *args: str, env: dict | None = None) -> str:
    result = snakemake(tmp_path, config, TARGET, *slurm_args(*args), timeout=300, env=env)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "has been submitted with SLURM jobid" not in out  # stopped before the first sbatch
    return out


def test_more_gpus_than_a_node_has_is_refused_before_submitting(tiny_model_dir, shared_data, tmp_path):
    """The node has one GPU: a job asking for two would wait in the queue forever."""
    out = small_run(tmp_path, tiny_config(tiny_model_dir, shared_data), "length_baseline:gpu=2")
    assert (
        f"SLURM partition '{PARTITION}' has no node with more than 1 GPU(s) (sinfo -o %G), but length_baseline asks for 2" in out
    )


def test_gpu_rules_on_a_cluster_without_gpus_are_refused_before_submitting(tiny_model_dir, shared_data, tmp_path):
    """device: cuda on a cluster whose nodes have no GPU (this one's fake GPU hidden: `sinfo` reports no gres)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    real = shutil.which("sinfo")
    (shim / "sinfo").write_text(f'#!/bin/sh\n"{real}" "$@" | sed "s/gpu:[0-9]*/(null)/"\n')
    (shim / "sinfo").chmod(0o755)
    config = tiny_config(tiny_model_dir, shared_data) | {"device": "cuda"}
    out = small_run(tmp_path / "w", config, env={"PATH": f"{shim}:{os.environ['PATH']}"})
    assert (
        f"SLURM partition '{PARTITION}' has no node with more than 0 GPU(s) (sinfo -o %G), but cache_activations asks for 1"
        in out
    )
    assert "Run on the CPU (config key device: cpu)" in out


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "SlurmctldPort=6899",
            "SLURM: the SLURM controller (slurmctld) is not reachable: `sinfo --noheader --Node '--format=%P|%G'` failed (",
        ),
        (
            "AccountingStoragePort=6899",
            "SLURM: SLURM accounting (slurmdbd) is not reachable: `sacct --noheader --allocations --starttime=now --format=JobID` failed (",
        ),
    ],
)
def test_cluster_down_gives_one_message_naming_the_daemon(tiny_model_dir, shared_data, tmp_path, setting, message):
    """A controller or accounting daemon that does not answer (here: the client is pointed at a port nothing
    listens on, SLURM_CONF) stops the run at once with one message, instead of the plugin waiting forever."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(Path("/etc/slurm/slurm.conf").read_text() + f"\n{setting}\n")
    out = small_run(tmp_path / "w", tiny_config(tiny_model_dir, shared_data), env={"SLURM_CONF": str(conf)})
    assert message in out, out[-3000:]
    assert "Is the cluster up? (on this machine: tests/slurm/up.sh)" in out


def test_the_paper_config_in_miniature_runs_through_slurm(tiny_model_dir, tmp_path):
    """config/paper/sarm-4b.yaml + miniature.yaml (with the tiny model) submitted through the SLURM profile: the
    fine-tuning jobs run two gloo processes under ZeRO-3 inside their SLURM job, as on a cluster's node."""
    workdir = tmp_path / "miniature"
    result = run_miniature(workdir, *slurm_args(), model=tiny_model_override(tiny_model_dir), overlay=TINY_OVERLAY, cores=None)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    jobs = submitted(out)
    assert {"finetune_reward", "sae", "evaluate", "paper_tables"} <= {job["rule"] for job in jobs.values()}, jobs
    states = {job: row["State"] for job, row in sacct(*jobs).items()}
    assert set(states) == set(jobs) and set(states.values()) == {"COMPLETED"}, states
    check_miniature_outputs(workdir)
