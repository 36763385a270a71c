"""The real DAG on a tiny config: a random-init 4-layer model, a few dozen real pairs, a small SAE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sarm.tables import CI_ROWS

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tiny_model_dir: Path, shared_data: Path) -> dict:
    return {
        "experiment": "smoke",
        "device": "cpu",
        "model": {"name": "tiny", "path": str(tiny_model_dir), "layer": 2, "dtype": "float32", "max_length": 96, "batch_size": 8},
        "datasets": {
            "hh-helpful": {"path": str(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"), "format": "hh_rlhf", "max_pairs": 30},
            "hh-harmless": {
                "path": str(shared_data / "hh-rlhf/harmless-base/test.jsonl.gz"),
                "format": "hh_rlhf",
                "max_pairs": 30,
            },
            "rb-like": {"path": str(shared_data / "rewardbench-like/rb_like_eval.jsonl.gz"), "format": "rewardbench"},
        },
        "train": {"datasets": ["hh-helpful", "hh-harmless"], "max_pairs": 48, "val_fraction": 0.25},
        "eval": {"datasets": ["rb-like"], "max_pairs_per_subset": 2},
        "sae": {"width": 256, "k": 8, "training_samples": 4096, "batch_size": 128},
        "reward": {"epochs": 4, "lr": 0.01, "batch_size": 8},
        "bon": {
            "path": str(shared_data / "bon/alpacaeval_bon_tulu2dpo13b_n11_200.jsonl.gz"),
            "max_prompts": 4,
            "reference": str(shared_data / "reference_results/bon_eval"),
            "curve_draws": 20,
        },
        "explain": {
            "n_weight": 3,
            "n_frequent": 2,
            "n_contexts": 6,
            "labels": {"n_features": 2, "n_contexts": 6, "retries": 0, "max_new_tokens": 6},
        },
        "shift": {"categories": ["safety"], "n_features": 2},
    }


SECRET = "sk-test-7c1e55d0-do-not-log"


def snakemake(
    workdir: Path, config: dict, *args: str, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
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
        "--cores",
        "2",
        *args,
    ]
    # Secrets in the environment, as on a real cluster: they must never reach a log or an output.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_API_KEY": SECRET, "OPENAI_API_KEY": SECRET, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def whole_tiny_dag(workdir: Path, tiny_model_dir: Path, shared_data: Path) -> Path:
    result = snakemake(workdir, tiny_config(tiny_model_dir, shared_data))
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


@pytest.fixture(scope="module")
def smoke_run(tiny_model_dir, shared_data, tmp_path_factory):
    return whole_tiny_dag(tmp_path_factory.mktemp("smoke"), tiny_model_dir, shared_data)


def test_whole_dag_writes_the_tables(smoke_run):
    tables = smoke_run / "results" / "tables"
    for table in ("val", "rb-like"):
        acc = pd.read_csv(tables / f"accuracy_{table}.csv")
        assert list(acc.columns) == ["category", "n", "sarm", "dense", "length"]
        assert list(acc["category"].iloc[-3:]) == ["overall", *CI_ROWS]  # the overall's bootstrap interval
        assert acc[["sarm", "dense", "length"]].apply(lambda c: c.between(0, 100)).all().all()
        low, overall, high = acc.set_index("category").loc[[CI_ROWS[0], "overall", CI_ROWS[1]], "sarm"]
        assert low <= overall <= high and low < high
    rb = pd.read_csv(tables / "accuracy_rb-like.csv").set_index("category")
    assert set(rb.index) == {"chat", "chat_hard", "safety", "reasoning", "overall", *CI_ROWS}
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
    from sarm.reward_model import RewardModel

    model = RewardModel.from_pretrained(smoke_run / "results/reward/sarm")
    pairs = read_pairs(smoke_run / "resources/tables/val.parquet").head(3)
    scores = pd.read_parquet(smoke_run / "results/eval/sarm/val/scores.parquet").head(3)
    raw = model.score(list(pairs.prompt), list(pairs.chosen))
    assert raw == pytest.approx(scores.score_chosen.to_numpy(), abs=1e-4)


def test_best_of_n_tables_score_every_candidate_from_one_cache(smoke_run):
    scores = pd.read_parquet(smoke_run / "results/bon/scores.parquet")
    assert len(scores) == 44 and {"sarm", "dense", "win_prob", "truncated"} <= set(scores.columns)
    meta = json.loads((smoke_run / "results/activations/tiny-L2/bon/meta.json").read_text())
    assert meta["n_sequences"] == 44 and meta["n_prompts"] == 4  # one forward per candidate, for both models
    table = pd.read_csv(smoke_run / "results/tables/bon_winrate.csv")
    ours = table[table.source == "this run"].set_index("selector")
    assert list(ours.index) == ["sarm", "dense", "random", "longest", "shortest", "oracle"] and (ours["N"] == 11).all()
    assert ours.loc["oracle", "win_rate"] >= ours["win_rate"].max() and (table.source != "this run").sum() == 7
    curve = pd.read_csv(smoke_run / "results/tables/bon_curve.csv")
    assert list(curve["N"]) == list(range(1, 12)) and curve["oracle"].iloc[-1] == pytest.approx(
        ours.loc["oracle", "win_rate"], abs=0.05
    )
    assert (smoke_run / "results/figures/bon_curve.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def avx2_run(tiny_model_dir, shared_data, tmp_path_factory):
    """The same DAG again, with ATen, MKL and oneDNN capped at AVX2: this machine computing as a CPU without
    AVX-512 or native bf16 does."""
    from sarm.provenance import AVX2_ONLY

    workdir = tmp_path_factory.mktemp("smoke-avx2")
    result = snakemake(workdir, tiny_config(tiny_model_dir, shared_data), env=AVX2_ONLY)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_same_seed_gives_bitwise_identical_results_with_or_without_avx512(smoke_run, avx2_run):
    """The same seed gives the same scores, head and SAE, bit for bit, here and on a CPU without AVX-512:
    float32 with the portable kernels (config key cpu_kernels)."""
    for scores in sorted((smoke_run / "results/eval").glob("*/*/scores.parquet")):
        again = avx2_run / scores.relative_to(smoke_run)
        assert pd.read_parquet(scores).equals(pd.read_parquet(again)), scores
    for weights in ("results/reward/sarm/head.safetensors", "results/sae/tiny-L2/model/sae_weights.safetensors"):
        assert (smoke_run / weights).read_bytes() == (avx2_run / weights).read_bytes(), weights


def test_a_cpu_without_avx512_prints_the_same_tables(smoke_run, avx2_run):
    """float32 and the portable kernels (config key cpu_kernels) give the same caches, bit for bit, and the same
    tables on a CPU without AVX-512; only the note naming the processor says which instructions it was held to."""
    for ours in sorted((smoke_run / "results/activations").glob("*/*/shard_*.safetensors")):
        assert ours.read_bytes() == (avx2_run / ours.relative_to(smoke_run)).read_bytes(), ours
    tables = sorted((smoke_run / "results/tables").glob("*.md"))
    assert len(tables) >= 4
    for ours in tables:
        capped = (avx2_run / ours.relative_to(smoke_run)).read_text().splitlines()
        lines = ours.read_text().splitlines()
        notes = [i for i, line in enumerate(lines) if "Computed with" in line]
        assert [line for i, line in enumerate(lines) if i not in notes] == [
            line for i, line in enumerate(capped) if i not in notes
        ], ours.name
        assert all("MKL_ENABLE_INSTRUCTIONS=AVX2" in capped[i] and "MKL_ENABLE" not in lines[i] for i in notes), ours.name
    for summary in sorted((smoke_run / "results/eval").glob("*/*/summary.json")):
        ours, theirs = json.loads(summary.read_text()), json.loads((avx2_run / summary.relative_to(smoke_run)).read_text())
        assert ours["accuracy"] == theirs["accuracy"], summary


def test_run_records_versions_and_data_checksums(smoke_run, shared_data):
    import hashlib

    record = json.loads((smoke_run / "results/provenance.json").read_text())
    assert {"torch", "transformers", "sae-lens"} <= set(record["versions"]) and record["versions"]["torch"]
    hh = shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"
    assert record["data"]["hh-helpful"]["sha256"] == hashlib.sha256(hh.read_bytes()).hexdigest()
    assert record["model"]["weights_sha256"]["model.safetensors"]


def test_secrets_never_reach_logs_or_outputs(smoke_run):
    leaks = [p for p in smoke_run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert (smoke_run / "config.yaml").exists() and any((smoke_run / "logs").rglob("*.log"))


def test_explain_stage_writes_attributions_cards_and_the_shift(smoke_run):
    results = smoke_run / "results"
    attributions = pd.read_parquet(results / "explain/sarm/attributions/rb-like.parquet")
    scores = pd.read_parquet(results / "eval/sarm/rb-like/scores.parquet")
    sums = attributions.groupby("seq")["contribution"].sum().to_numpy()
    assert sums[0::2] == pytest.approx(scores.score_chosen.to_numpy(), abs=1e-5)
    page = (results / "explain/sarm/cards.html").read_text()
    stats = json.loads((results / "explain/sarm/features.json").read_text())
    assert page.count('<section class="card"') == len(stats["features"]) >= 3 and "data:image/png;base64," in page
    pages = sorted(p.name for p in (results / "explain/sarm/token_rewards").glob("*.html"))  # explain.token_rewards: 3 pairs
    assert pages == sorted(["index.html", *(f"{i:03d}_{side}.html" for i in range(3) for side in ("chosen", "rejected"))])
    labels = json.loads((results / "explain/sarm/labels.json").read_text())
    assert len(labels) == 2 and {v["status"] for v in labels.values()} <= {"labelled", "unlabelled", "cached"}
    shift = pd.read_csv(results / "tables/preference_shift.csv")
    assert shift["set"].iloc[0] == "target set" and (shift["mean_shift_not_firing"] == 0).all()
    assert {"chat", "chat_hard", "safety", "reasoning", "overall"} <= set(shift["set"]) and set(shift["table"]) == {
        "val",
        "rb-like",
    }
    assert (results / "shift/sarm/model/reward_model.json").exists() and (
        results / "figures/preference_shift.png"
    ).stat().st_size > 10_000


def test_sae_killed_mid_training_resumes_under_rerun_incomplete(smoke_run, tiny_model_dir, shared_data, tmp_path):
    config, target = tiny_config(tiny_model_dir, shared_data), "results/sae/tiny-L2/model"
    killed = snakemake(tmp_path, config, target, env={"SARM_KILL_AT": "sae:20"})
    assert killed.returncode != 0 and not (tmp_path / target).exists()
    assert any((tmp_path / f"{target}.checkpoints").glob("*/COMPLETE"))
    resumed = snakemake(tmp_path, config, target, "--rerun-incomplete")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming SAE training from" in (tmp_path / "logs/sae/tiny-L2.log").read_text()
    weights = "results/sae/tiny-L2/model/sae_weights.safetensors"
    assert (tmp_path / weights).read_bytes() == (smoke_run / weights).read_bytes()  # as if never killed
    assert not (tmp_path / f"{target}.checkpoints").exists()


def test_second_run_has_nothing_to_do(smoke_run, tiny_model_dir, shared_data):
    result = snakemake(smoke_run, tiny_config(tiny_model_dir, shared_data), "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


def test_report_of_the_finished_run_embeds_its_figures_and_pages(smoke_run, tiny_model_dir, shared_data, tmp_path):
    """`snakemake --report` (Snakemake's own HTML reporter) on the finished tiny run: one self-contained page with
    every output the rules mark with report(), under its category, and the workflow's description."""
    report = tmp_path / "report.html"
    result = snakemake(smoke_run, tiny_config(tiny_model_dir, shared_data), "--report", str(report))
    assert result.returncode == 0, result.stderr[-4000:]
    page = report.read_text()
    for category in ("Best-of-N", "Interpretability"):
        assert category in page, category
    for name in ("accuracy.png", "bon_curve.png", "cards.html", "preference_shift.png"):
        assert name in page, name
    assert "Terry head over the TopK latents" in page  # workflow/report/workflow.rst (the page JSON-escapes the dash)


# --- what re-runs: an edited local source does, a throughput-only key does not ---


def test_editing_a_local_data_file_reruns_its_fetch(tiny_model_dir, shared_data, tmp_path):
    """Swapping chosen/rejected in a local eval file re-ran nothing (`snakemake -n`: nothing to be done) and
    provenance kept the old checksum: the file was no input of fetch_dataset."""
    import gzip

    config = tiny_config(tiny_model_dir, shared_data)
    local = tmp_path / "rb.jsonl"
    rows = [json.loads(line) for line in gzip.open(shared_data / "rewardbench-like/rb_like_eval.jsonl.gz", "rt")][:20]
    local.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config["datasets"]["rb-like"]["path"] = str(local)
    target = "resources/data/rb-like.parquet"
    assert snakemake(tmp_path / "w", config, target).returncode == 0
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(tmp_path / "w", config, target, "-n"))
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    local.write_text("".join(json.dumps(row) + "\n" for row in swapped))
    os.utime(local, (local.stat().st_atime, (tmp_path / "w" / target).stat().st_mtime + 5))
    again = snakemake(tmp_path / "w", config, target, "-n")
    assert again.returncode == 0 and "fetch_dataset" in again.stdout and "Nothing to be done" not in again.stdout + again.stderr


def test_changing_model_batch_size_fetches_nothing_but_editing_the_local_model_does(tiny_model_dir, shared_data, tmp_path):
    """model.batch_size (throughput only) re-fetched the model, and so re-ran the whole DAG."""
    config = tiny_config(tiny_model_dir, shared_data)
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    config["model"]["path"] = str(tmp_path / "model")
    target = "resources/models/tiny"
    assert snakemake(tmp_path / "w", config, target).returncode == 0
    config["model"]["batch_size"] = 3
    result = snakemake(tmp_path / "w", config, target, "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr
    edited = tmp_path / "model" / "config.json"  # an edited file of the folder (its content: mtime alone is not enough)
    edited.write_text(json.dumps({**json.loads(edited.read_text()), "rope_theta": 20000.0}))
    os.utime(edited, (time.time() + 5, time.time() + 5))
    result = snakemake(tmp_path / "w", config, target, "-n")
    assert result.returncode == 0 and "fetch_model" in result.stdout


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
        ({"model__layer": -3}, "config key model.layer: -3 is less than the minimum of 1"),
        ({"device": "gpu"}, "config key device: 'gpu' does not match"),
        ({"eval": {"datasets": ["train"]}}, "config key eval.datasets: 'train' is not defined under datasets"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(tiny_model_dir, shared_data, tmp_path, changes, message):
    result = snakemake(tmp_path, bad(tiny_model_dir, shared_data, **changes), "-n")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("datasets", "..", "config key datasets: '..' cannot be a name; it becomes a folder name"),
        ("eval", "tokens", "config key eval.datasets: 'tokens' is reserved for the SAE corpus caches"),
        ("explain", "..", "config key explain.table: '..' is not one of the tables (train, val, rb-like)"),
    ],
)
def test_a_name_that_would_escape_its_folder_is_refused(tiny_model_dir, shared_data, tmp_path, key, value, message):
    """`..` as a data set made its cache folder results/activations itself (Snakemake then deleted the train
    and val caches) and two reward models write one results/eval/scores.parquet."""
    config = tiny_config(tiny_model_dir, shared_data)
    if key == "explain":
        config["explain"]["table"] = value
    else:
        config["datasets"][value] = config["datasets"].pop("rb-like")
        config["eval"]["datasets"] = [value]
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_layer_outside_the_model_fails_in_its_rule_and_leaves_nothing(tiny_model_dir, shared_data, tmp_path):
    config = bad(tiny_model_dir, shared_data, model__layer=9)
    result = snakemake(tmp_path, config, "results/activations/tiny-L9/val")
    assert result.returncode != 0
    assert "config key model.layer = 9 is outside the model's layers (valid: 1..4)" in result.stderr
    assert not (tmp_path / "results/activations/tiny-L9/val").exists()


def test_missing_data_file_names_the_file(tiny_model_dir, shared_data, tmp_path):
    config = tiny_config(tiny_model_dir, shared_data)
    config["datasets"]["hh-helpful"]["path"] = str(tmp_path / "missing.jsonl.gz")
    result = snakemake(tmp_path, config, "resources/data/hh-helpful.parquet")
    assert result.returncode != 0 and str(tmp_path / "missing.jsonl.gz") in result.stderr
    assert not (tmp_path / "resources/data/hh-helpful.parquet").exists()


def test_results_say_which_dtype_and_processor_computed_them(smoke_run):
    from sarm.provenance import PORTABLE_CPU, machine

    here = {**machine(), "isa_caps": PORTABLE_CPU}  # config key cpu_kernels: portable (the default)
    summary = json.loads((smoke_run / "results/eval/sarm/val/summary.json").read_text())
    assert summary["computed_with"] == {"dtype": "float32", "machine": here}  # the cache's record
    meta = json.loads((smoke_run / "results/activations/tiny-L2/val/meta.json").read_text())
    assert meta["machine"] == here and meta["dtype"] == "float32"
    table = (smoke_run / "results/tables/accuracy_val.md").read_text()
    assert f"Computed with: hidden states in float32 on {here['cpu']} (" in table
    for table in sorted((smoke_run / "results/tables").glob("*.md")):  # SAE metrics, best-of-N, shift, orderings too
        assert f"Computed with: hidden states in float32 on {here['cpu']} (" in table.read_text(), table.name
