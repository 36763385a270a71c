"""The paper config in miniature: it differs from the paper's only in scale, its stand-ins have the hub layouts, and it
runs end to end (with conftest's tiny random model in place of SmolLM2, to fit the test budget)."""

from __future__ import annotations

import fnmatch

import pandas as pd
import pytest
import yaml
from miniature import MINIATURE_CONFIG, PAPER_CONFIG, TINY_OVERLAY, check_miniature_outputs, run_miniature, tiny_model_override

# The keys config/paper/miniature.yaml may set differently from config/paper/sarm-4b.yaml, and why. Anything else
# it changes fails the test: what runs here is what runs on the cluster.
MINIATURE_KEYS = {
    "experiment": "its own name (the wandb group)",
    "results_dir": "its own folders",
    "resources_dir": "its own folders",
    "device": "the CPU",
    "hub.mirror": "the folder of the stand-ins; the data sets' hub ids stay the paper's",
    "miniature.*": "builds the stand-ins (and the model) into the mirror",
    "model.name": "the model",
    "model.hub_id": "the model",
    "model.layer": "the model's middle layer",
    "model.max_length": "size",
    "model.batch_size": "size",
    "train.max_pairs": "size",
    "eval.max_pairs_per_subset": "size",
    "sae.width": "size (null: the paper's ratios to the hidden size)",
    "sae.k": "size (null: the paper's ratios to the hidden size)",
    "sae.training_samples": "size",
    "sae.batch_size": "size",
    "explain.labels.n_contexts": "size (the local CPU judge)",
    "sae.corpus*": "OpenWebText2 is not on this machine: the training pairs, the paper config's documented alternative",
    "finetune.epochs": "size",
    "finetune.global_batch_size": "size",
    "finetune.max_pairs": "size",
    "finetune.cpu_processes": "processes (the paper's finetune.gpus is unused on the CPU)",
    "cluster.*": "job sizes of the SLURM profile (never part of a result)",
}


def flatten(config: dict, prefix: str = "") -> dict:
    """{dotted key: leaf value}; a mapping is a branch, anything else (lists included) a leaf."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_miniature_differs_from_the_paper_only_in_scale():
    paper = flatten(yaml.safe_load(PAPER_CONFIG.read_text()))
    miniature = flatten(yaml.safe_load(MINIATURE_CONFIG.read_text()))
    changed = sorted(key for key, value in miniature.items() if key not in paper or paper[key] != value)
    unexplained = [key for key in changed if not any(fnmatch.fnmatchcase(key, allowed) for allowed in MINIATURE_KEYS)]
    assert unexplained == [], f"config/paper/miniature.yaml changes keys outside MINIATURE_KEYS: {unexplained}"
    # the paper's data sets, reward models, recipe and scoring are untouched: only their scale moves
    assert not any(key.startswith(("datasets.", "reward_models.", "train.datasets", "eval.datasets")) for key in changed)
    assert {"hub.mirror", "model.hub_id", "miniature.enabled"} <= set(changed)
    for key in (
        "finetune.lr",
        "finetune.dtype",
        "finetune.gradient_checkpointing",
        "finetune.per_device_batch_size",
        "finetune.zero3",
        "model.dtype",
        "sae.lr",
        "sae.include_final_token",
        "wandb.mode",
    ):
        assert key in paper and key not in miniature, key


def test_stand_ins_have_the_hub_layouts(shared_data, tmp_path):
    from sarm import miniature
    from sarm.data import load_pairs
    from sarm.rewardbench import V2_SUBSETS

    rb_like = shared_data / "rewardbench-like/rb_like_eval.jsonl.gz"
    hh = [shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"]
    skywork = miniature.chat_table(hh)
    assert list(skywork.columns) == ["chosen", "rejected", "source"]
    first = skywork.iloc[0]
    assert first.chosen[:-1] == first.rejected[:-1] and first.chosen[-1]["role"] == "assistant"
    assert set(first.chosen[0]) == {"role", "content"} and first.source == "hh-rlhf/helpful-base"
    v1 = miniature.rewardbench_table(rb_like)
    assert list(v1.columns) == ["prompt", "chosen", "chosen_model", "rejected", "rejected_model", "subset", "id"]
    assert "mtbench-human" not in set(v1.subset) and v1.id.dtype == "int64"
    v2 = miniature.rewardbench2_table(rb_like)
    assert list(v2.columns) == [
        "id",
        "prompt",
        "chosen",
        "rejected",
        "num_correct",
        "num_rejected",
        "total_completions",
        "models",
        "subset",
    ]
    assert list(dict.fromkeys(v2.subset)) == V2_SUBSETS
    best_of_4 = v2[v2.subset != "Ties"]
    assert (best_of_4.num_correct == 1).all() and (best_of_4.num_rejected == 3).all()
    assert all(row.chosen[0] not in row.rejected and len(set(row.rejected)) == 3 for row in best_of_4.itertuples())
    ties = v2[v2.subset == "Ties"].set_index("id")
    numbers = {i.partition(":")[2] for i in ties.index}
    assert len(ties) == 2 * len(numbers) >= 12 and all(ties.loc[f"tied:{n}", "num_correct"] >= 2 for n in numbers)
    assert all(ties.loc[f"ref:{n}", "num_correct"] == 1 for n in numbers)

    # read back through a mirror as the workflow reads the paper's hub ids: format rewardbench2, benchmark v2
    mirror = tmp_path / "mirror"
    miniature.write_parquet(v2, miniature.split_file(mirror, "allenai/reward-bench-2", "test"))
    pairs, report = load_pairs(
        "reward-bench-2", {"hub": "allenai/reward-bench-2", "split": "test", "format": "rewardbench2"}, str(mirror)
    )
    assert report["skipped"] == {} and (pairs["benchmark"] == "rewardbench-2").all()
    assert len(pairs) == 3 * len(best_of_4) + sum(max(r.num_correct, r.num_rejected) for r in ties.itertuples())


def test_rows_measured_on_stand_ins_never_claim_the_benchmark():
    from sarm.tables import measured_on

    rb2 = {"benchmark": "rewardbench-2", "n_prompts": {"Math": 6, "Ties": 12}, "complete": False, "n_pairs": 54}
    assert measured_on(rb2, "reward-bench-2", stand_in=True) == (
        "RewardBench 2 stand-in (miniature, 18 prompts from ../shared/data; scored the official way, not the benchmark)"
    )
    assert measured_on(rb2, "reward-bench-2").startswith("RewardBench 2 (official, reproduced")
    v1 = {"benchmark": "rewardbench-v1", "n_pairs": 84, "complete": False}
    assert measured_on(v1, "reward-bench", stand_in=True).startswith("RewardBench v1 stand-in (miniature, 84 pairs")
    assert measured_on({"n_pairs": 20, "categories": []}, "val", stand_in=True) == "val (local, 20 pairs)"


def test_a_miniature_without_a_mirror_stops_with_one_line(tmp_path):
    result = run_miniature(tmp_path, "-n", overlay={"hub": {"mirror": None}}, timeout=300)
    assert result.returncode != 0
    assert "config key miniature.enabled: give hub.mirror, the folder the stand-ins are built in" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def miniature_run(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("miniature")
    result = run_miniature(workdir, model=tiny_model_override(tiny_model_dir), overlay=TINY_OVERLAY)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


@pytest.mark.slow
@pytest.mark.paper_path
def test_miniature_runs_end_to_end_with_the_official_rewardbench2_scoring(miniature_run):
    rb2 = check_miniature_outputs(miniature_run)
    # every RewardBench 2 prompt's pairs were scored: 3 per best-of-4 prompt, max(correct, incorrect) per Ties prompt
    scores = pd.read_parquet(miniature_run / "results/miniature/eval/sarm/reward-bench-2/scores.parquet")
    assert scores.groupby("group").size().loc[lambda n: n.index.str.match(r"^\d+$")].eq(3).all()
    assert rb2["n_pairs"] == len(scores)
