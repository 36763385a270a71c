"""Run the paper config in miniature (config/paper/sarm-4b.yaml + config/paper/miniature.yaml) in a scratch folder.

A helper, not a test module: tests/test_miniature.py runs it on this machine and tests/test_workflow_slurm.py through a
SLURM cluster, each with its own extra Snakemake arguments:

    from miniature import TINY_OVERLAY, run_miniature, tiny_model_override
    result = run_miniature(workdir, "--workflow-profile", "profiles/slurm", model=tiny_model_override(tiny_model_dir),
                           overlay=TINY_OVERLAY)
    assert result.returncode == 0, result.stderr[-4000:]
    check_miniature_outputs(workdir)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "config/paper/sarm-4b.yaml"
MINIATURE_CONFIG = REPO / "config/paper/miniature.yaml"
RESULTS = "results/miniature"  # results_dir of config/paper/miniature.yaml, inside the working directory


def tiny_model_override(model_dir: str | Path) -> dict:
    """The `model:` keys that swap SmolLM2 for conftest's tiny random model (4 layers: the middle is layer 2)."""
    return {"name": "tiny", "path": str(model_dir), "hub_id": None, "layer": 2}


# The tiny random model's head, after 4 fine-tuning steps, has no positive weight on a feature that fires on the Safety
# stand-ins, so the preference shift has nothing to edit (its one-line error is right): runs on it leave the shift out.
TINY_OVERLAY = {"shift": {"categories": []}}


def run_miniature(
    workdir: str | Path,
    *extra_args: str,
    model: dict | None = None,
    overlay: dict | None = None,
    cores: int | None = 2,
    timeout: int = 1500,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`snakemake --configfile sarm-4b.yaml miniature.yaml [overlay] --directory workdir --cores N *extra_args`.

    `model`: keys laid over `model:` (e.g. `tiny_model_override`); `overlay`: any other keys, laid over the
    miniature's (Snakemake merges config files key by key). Both go into a third config file written to workdir.
    `cores=None` leaves --cores out (a profile that sets jobs instead)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    configs = [str(PAPER_CONFIG), str(MINIATURE_CONFIG)]
    overlay = {**(overlay or {}), **({"model": model} if model else {})}
    if overlay:
        path = workdir / "miniature-overlay.yaml"
        path.write_text(yaml.safe_dump(overlay))
        configs.append(str(path))
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        *configs,
    ]
    if cores is not None:
        command += ["--cores", str(cores)]
    command += list(extra_args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def check_miniature_outputs(workdir: str | Path) -> dict:
    """Assert what a finished miniature must have written: the stand-in mirror read through hub.mirror, both tuned
    reward models, RewardBench 2 scored the official way (best-of-4 subsets and Ties), RewardBench v1 sections, and
    the paper tables with stand-in rows. Returns the RewardBench 2 summary of `sarm`."""
    workdir = Path(workdir)
    results = workdir / RESULTS
    mirror = workdir / "resources/miniature/hub-mirror"
    for hub, split in (
        ("Skywork/Skywork-Reward-Preference-80K-v0.2", "train"),
        ("allenai/reward-bench", "filtered"),
        ("allenai/reward-bench-2", "test"),
    ):
        assert (mirror / hub / "data" / f"{split}-00000-of-00001.parquet").is_file(), f"{hub} not in the mirror"
    for rm in ("sarm", "dense"):
        config = json.loads((results / "reward" / rm / "reward_model.json").read_text())
        assert config["training"]["mode"] == "finetune", config["training"]
        # two gloo processes trained together under the paper's ZeRO-3: different pairs, each holding a shard
        ranks = json.loads((results / "reward" / rm / "ranks.json").read_text())
        assert ranks["world_size"] == 2 and ranks["backend"] == "gloo", ranks
        first, second = (set(rank["pairs"]) for rank in ranks["ranks"])
        assert first and second and not first & second, ranks
        assert all(rank["local_parameters"] < 0.55 * rank["parameters"] for rank in ranks["ranks"]), ranks

    rb2 = json.loads((results / "eval/sarm/reward-bench-2/summary.json").read_text())
    assert rb2["benchmark"] == "rewardbench-2" and rb2["complete"] is False
    scores = rb2["benchmark_scores"]
    assert set(scores) == {"Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties", "score"}, scores
    assert all(0 <= value <= 1 for value in scores.values()), scores
    assert math.isclose(scores["score"], sum(scores[s] for s in scores if s != "score") / 6)
    assert rb2["n_prompts"]["Ties"] == 12  # 6 ref/tied prompt pairs: 12 groups
    assert all(rb2["n_prompts"][s] == 6 for s in ("Factuality", "Precise IF", "Math", "Safety", "Focus"))
    ties = rb2["ties"]
    assert ties["shared_prompts"] == 6 and ties["score"] == scores["Ties"]
    v1 = json.loads((results / "eval/sarm/reward-bench/summary.json").read_text())
    assert v1["benchmark"] == "rewardbench-v1"
    assert set(v1["benchmark_scores"]) == {"Chat", "Chat Hard", "Safety", "Reasoning", "score"}

    table1 = pd.read_csv(results / "tables/table1_rewardbench2.csv")
    ours = table1[table1["source"].str.startswith("reproduced")]
    assert set(ours["model"]) >= {"sarm (smollm2-135m-instruct)", "dense (smollm2-135m-instruct)"} or set(ours["model"]) >= {
        "sarm (tiny)",
        "dense (tiny)",
    }, ours
    assert ours["data set"].str.contains("stand-in").all() and not ours["data set"].str.contains("official,").any()
    sarm = ours[ours["model"].str.startswith("sarm")].iloc[0]
    assert sarm["Ties"] == round(100 * scores["Ties"], 1) and sarm["overall"] == round(100 * scores["score"], 1)
    for name in ("table1_rewardbench_v1", "table2_ablations", "table1_local"):
        assert (results / f"tables/{name}.md").stat().st_size > 0
    assert (results / "figures/paper_tables.png").stat().st_size > 10_000
    # the interpretability section, read through sarm's own fine-tuned layers 1..L
    for table in ("val", "reward-bench-2", "reward-bench"):
        attributions = pd.read_parquet(results / f"explain/sarm/attributions/{table}.parquet")
        assert len(attributions) > 0, table
        assert (results / f"activations/tuned/sarm/{table}/meta.json").is_file(), table
    assert "fine-tuned" in (results / "explain/sarm/cards.html").read_text()
    return rb2
