"""The paper's tables (sarm.tables.paper_tables) on hand-built summaries and the real published leaderboards."""

from pathlib import Path

import pandas as pd
import pytest

from sarm.errors import SarmError
from sarm.tables import (
    ABLATIONS,
    RB2_COLUMNS,
    V1_COLUMNS,
    ablation_of,
    leaderboard_rows,
    measured_on,
    paper_tables,
    paper_tables_figure,
    write_table,
)
from sarm.variants import specs_from_config, specs_from_dicts

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference_results"
BOARD_MODELS = ["Schrieffer/Llama-SARM-4B", "RLHFlow/ArmoRM-Llama3-8B-v0.1", "not/on-any-board"]

REWARD_MODELS = {
    "sarm": {"features": "sae", "mode": "frozen", "sae": "sequence", "topk": True},
    "sarm-finetuned": {"features": "sae", "mode": "finetune", "sae": "sequence", "topk": True},
    "sarm-random-sae": {"features": "sae", "mode": "frozen", "sae": "random", "topk": True},
    "sarm-token-sae": {"features": "sae", "mode": "frozen", "sae": "token", "topk": True},
    "sarm-no-topk": {"features": "sae", "mode": "frozen", "sae": "sequence", "topk": False},
    "sarm-joint": {"features": "sae", "mode": "joint", "sae": "sequence", "topk": True},
    "dense": {"features": "hidden", "mode": "frozen", "sae": None, "topk": True},
}


def local_summary(overall, chat, safety, n=420):
    """A summary.json of a local set (categories chat and safety)."""
    return {
        "benchmark": "local",
        "n_pairs": n,
        "categories": [
            {"category": "chat", "n": n // 2, "accuracy": chat, "weighting": "by-size"},
            {"category": "safety", "n": n // 2, "accuracy": safety, "weighting": "by-size"},
            {"category": "overall", "n": n, "accuracy": overall, "weighting": "mean-of-categories"},
        ],
        "benchmark_scores": {"chat": chat, "safety": safety, "overall": overall},
    }


def rb2_summary(score, complete=False):
    subsets = {s: score for s in RB2_COLUMNS[1:]}
    n_prompts = {"Factuality": 475, "Precise IF": 160, "Math": 183, "Safety": 450, "Focus": 495, "Ties": 102}
    if not complete:
        n_prompts = {s: 10 for s in n_prompts}
    return {
        "benchmark": "rewardbench-2",
        "n_pairs": 999,
        "n_prompts": n_prompts,
        "complete": complete,
        "categories": [],
        "benchmark_scores": {**subsets, "score": score},
    }


@pytest.fixture
def summaries():
    out = {}
    for i, model in enumerate([*REWARD_MODELS, "length"]):
        out[model, "rb-like"] = local_summary(0.5 + i / 100, 0.6, 0.4)
    out["sarm", "rb2"] = rb2_summary(0.25)
    out["sarm-token-sae", "rb2"] = rb2_summary(0.2)
    out["dense", "rb2"] = rb2_summary(0.3)
    return out


@pytest.fixture
def tables(summaries):
    return paper_tables(summaries, specs_from_dicts(REWARD_MODELS), REFERENCE, BOARD_MODELS, "smollm2")


def test_ablation_mapping_by_spec():
    specs = specs_from_dicts(REWARD_MODELS)  # as the rule's params give them
    assert [ablation_of(specs[name]) for name in REWARD_MODELS] == [
        "SARM",
        "SARM",
        "SAE encoder random init",
        "token-level SAE",
        None,
        None,
        None,
    ]
    assert ablation_of(specs_from_config({"reward_models": {"x": {}}})["x"]) == "SARM"  # frozen, sequence-level, TopK


def test_local_rows_never_sit_under_official_columns(tables):
    official = ["table1_rewardbench2", "table1_rewardbench_v1", "table2_ablations"]
    for name in official:
        assert tables[name]["data set"].str.startswith(("RewardBench 2 (official", "RewardBench v1 (official")).all(), name
        assert not tables[name]["data set"].str.contains("local").any(), name
    local = tables["table1_local"]
    assert set(local["data set"]) == {"rb-like (local, 420 pairs)"}
    assert list(local.columns) == ["model", "data set", "source", "overall", "chat", "safety"]
    assert not set(RB2_COLUMNS[1:]) & set(local.columns)
    assert len(local) == len(REWARD_MODELS) + 1  # every reward model and the length baseline
    # sarm is the first model: 0.5 overall, 0.6 chat -> 50.0, 60.0 (%).
    assert local.iloc[0][["model", "overall", "chat"]].tolist() == ["sarm (smollm2)", 50.0, 60.0]


def test_table1_rewardbench2_rows(tables):
    t1 = tables["table1_rewardbench2"]
    assert list(t1.columns) == ["model", "size", "data set", "source", *RB2_COLUMNS]
    paper = t1[t1["source"] == "arXiv 2508.08746, Table 1"].set_index("model")
    assert paper.loc["SARM-4B", RB2_COLUMNS].tolist() == [73.6, 68.5, 42.5, 63.9, 91.3, 96.0, 79.6]
    assert not paper.index.str.contains("ablation|random init|token-level").any()  # those are Table 2's
    board = t1[t1["source"].str.startswith("leaderboard")].set_index("model")
    # Leaderboard: Schrieffer/Llama-SARM-4B Score 0.7379 -> 73.8; a model on no board is left out.
    assert list(board.index) == BOARD_MODELS[:2]
    assert board.loc["Schrieffer/Llama-SARM-4B", "overall"] == 73.8
    ours = t1[t1["source"].str.startswith("reproduced")]
    assert ours["model"].tolist() == ["sarm (smollm2)", "sarm-token-sae (smollm2)", "dense (smollm2)"]
    assert set(ours["data set"]) == {"RewardBench 2 (official, reproduced, subsample, 60 of 1,865 prompts)"}
    assert ours["overall"].tolist() == [25.0, 20.0, 30.0]


def test_v1_leaderboard_overall_is_the_mean_of_four_sections():
    got = leaderboard_rows(REFERENCE / "rewardbench_v1_leaderboard.csv", BOARD_MODELS, "rewardbench-v1")
    # ArmoRM: (0.9693 + 0.7675 + 0.9054 + 0.9735) / 4 = 0.903925 -> 90.4, the paper's figure (the board's
    # Score, 0.886, also folds in Prior Sets).
    assert got["model"].tolist() == ["RLHFlow/ArmoRM-Llama3-8B-v0.1"]
    assert got[V1_COLUMNS].iloc[0].tolist() == [90.4, 96.9, 76.8, 90.5, 97.4]


def test_leaderboard_missing_column(tmp_path):
    path = tmp_path / "board.csv"
    pd.DataFrame({"model": ["m"], "Score": [0.5], "Factuality": [0.5]}).to_csv(path, index=False)
    with pytest.raises(SarmError, match=r"board\.csv: column 'Precise IF' missing"):
        leaderboard_rows(path, ["m"], "rewardbench-2")


def test_table2_maps_variants_to_ablation_rows(tables):
    t2 = tables["table2_ablations"]
    published = t2[t2["source"] == "arXiv 2508.08746, Table 2"]
    assert published["ablation"].tolist() == ABLATIONS
    assert published["overall"].tolist() == [73.6, 68.4, 71.5]
    ours = t2[t2["source"].str.startswith("reproduced")]
    # dense has an RB2 summary but is no ablation row; sarm-token-sae is the token-level one.
    assert list(zip(ours["ablation"], ours["model"])) == [
        ("SARM", "sarm (smollm2)"),
        ("token-level SAE", "sarm-token-sae (smollm2)"),
    ]
    local = tables["table2_ablations_local"]
    assert list(zip(local["ablation"], local["mode"], local["model"])) == [
        ("SARM", "frozen", "sarm (smollm2)"),
        ("SARM", "finetune", "sarm-finetuned (smollm2)"),
        ("SAE encoder random init", "frozen", "sarm-random-sae (smollm2)"),
        ("token-level SAE", "frozen", "sarm-token-sae (smollm2)"),
    ]
    assert not set(RB2_COLUMNS[1:]) & set(local.columns)


def test_default_reward_models_and_no_reference(summaries):
    got = paper_tables({("sarm", "val"): summaries["sarm", "rb-like"], ("dense", "val"): summaries["dense", "rb-like"]})
    assert got["table2_ablations_local"]["model"].tolist() == ["sarm ()"]
    assert not got["table1_rewardbench2"]["source"].str.startswith("leaderboard").any()


def test_measured_on_labels():
    assert measured_on(rb2_summary(0.5, complete=True), "rb2") == "RewardBench 2 (official, reproduced, 1,865 prompts)"
    v1 = {"benchmark": "rewardbench-v1", "n_pairs": 100, "complete": False}
    assert measured_on(v1, "rb") == "RewardBench v1 (official, reproduced, subsample, 100 of 2,985 pairs)"
    assert measured_on({"n_pairs": 180, "categories": []}, "val") == "val (local, 180 pairs)"  # older summaries


def test_files_and_figure(tables, tmp_path):
    write_table(tables["table1_local"], tmp_path / "t1", "Local", "a note")
    text = (tmp_path / "t1.md").read_text()
    assert text.startswith("# Local\n") and text.rstrip().endswith("a note") and "nan" not in text
    assert pd.read_csv(tmp_path / "t1.csv").shape == tables["table1_local"].shape
    paper_tables_figure(tables, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
