"""Tests for sarm.rewardbench: hand-worked cases plus a published RewardBench v1 row."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sarm.errors import SarmError
from sarm.rewardbench import (
    EXAMPLE_COUNTS,
    SCORE_COLUMNS,
    SECTIONS,
    category_scores,
    length_baseline,
    pair_correct,
    rewardbench_v1_sections,
    subset_table,
    summarize,
)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference_results"


def scores_frame(rows):
    """Score table from (subset, category, score_chosen, score_rejected) tuples."""
    return pd.DataFrame(
        [
            {"id": f"p{i}", "subset": s, "category": c, "score_chosen": sc, "score_rejected": sr}
            for i, (s, c, sc, sr) in enumerate(rows)
        ]
    )


def test_pair_correct_needs_a_strict_win():
    # 2>1 right; 1=1 tie wrong; 1<2 wrong; NaN on either side wrong.
    got = pair_correct([2.0, 1.0, 1.0, np.nan, 0.0], [1.0, 1.0, 2.0, 0.0, np.nan])
    assert got.dtype == bool
    assert got.tolist() == [True, False, False, False, False]


def test_subset_table_counts_and_sorts():
    scores = scores_frame(
        [
            ("zeta", "B", 1.0, 0.0),  # right
            ("alpha", "B", 0.0, 1.0),  # wrong
            ("alpha", "B", 3.0, 2.0),  # right
            ("alpha", "B", 2.0, 2.0),  # tie: wrong
            ("gamma", "A", 5.0, 4.0),  # right
        ]
    )
    got = subset_table(scores)
    assert list(got.columns) == ["category", "subset", "n", "accuracy"]
    # Sorted by category then subset: (A, gamma), (B, alpha), (B, zeta).
    assert list(zip(got["category"], got["subset"])) == [("A", "gamma"), ("B", "alpha"), ("B", "zeta")]
    assert got["n"].tolist() == [1, 3, 1]
    # alpha: 1 right of 3.
    assert got["accuracy"].tolist() == pytest.approx([1.0, 1 / 3, 1.0])


def test_subset_under_two_categories_is_an_error():
    scores = scores_frame([("shared-set", "A", 1.0, 0.0), ("shared-set", "B", 1.0, 0.0), ("x", "A", 1, 0)])
    with pytest.raises(SarmError, match="shared-set"):
        subset_table(scores)


@pytest.mark.parametrize("column", SCORE_COLUMNS)
def test_missing_score_column_is_an_error(column):
    scores = scores_frame([("s", "c", 1.0, 0.0)]).drop(columns=column)
    with pytest.raises(SarmError, match=column):
        subset_table(scores)


def test_official_subsets_use_official_counts():
    subsets = pd.DataFrame(
        {
            "category": ["Reasoning", "Reasoning"],
            "subset": ["hep-python", "math-prm"],
            "n": [2, 2],
            "accuracy": [1.0, 0.5],
        }
    )
    got = category_scores(subsets).set_index("category")
    # (164*1.0 + 984*0.5) / (164 + 984) = 656/1148 = 4/7 (by size it would be 0.75).
    assert got.loc["Reasoning", "accuracy"] == pytest.approx(4 / 7)
    assert got.loc["Reasoning", "weighting"] == "rewardbench-v1"
    assert got.loc["Reasoning", "n"] == 4


def test_local_subsets_weighted_by_size_and_overall_is_mean_of_categories():
    subsets = pd.DataFrame(
        {
            "category": ["local", "local", "mix", "mix", "Reasoning"],
            "subset": ["a", "b", "hep-go", "mine", "hep-python"],
            "n": [1, 3, 10, 36, 5],
            "accuracy": [1.0, 0.0, 1.0, 0.0, 0.6],
        }
    )
    got = category_scores(subsets)
    assert got["category"].tolist() == ["Reasoning", "local", "mix", "overall"]
    got = got.set_index("category")
    # local: (1*1.0 + 3*0.0) / 4 = 0.25 (the unweighted mean would be 0.5).
    assert got.loc["local", "accuracy"] == pytest.approx(0.25)
    assert got.loc["local", "weighting"] == "by-size"
    # mix: hep-go weighs 164 (official), "mine" its n=36: 164*1.0 / 200 = 0.82.
    assert got.loc["mix", "accuracy"] == pytest.approx(0.82)
    assert got.loc["mix", "weighting"] == "mixed"
    assert got.loc["Reasoning", "accuracy"] == pytest.approx(0.6)
    # overall: unweighted mean of 0.6, 0.25, 0.82 = 1.67/3; n = 1+3+10+36+5 = 55.
    assert got.loc["overall", "accuracy"] == pytest.approx(1.67 / 3)
    assert got.loc["overall", "n"] == 55


def test_rewardbench_v1_sections_by_hand():
    acc = {name: 0.0 for names in SECTIONS.values() for name in names}
    acc["alpacaeval-easy"] = 1.0
    acc["mt-bench-hard"] = 1.0
    for name in SECTIONS["Chat Hard"][1:]:  # the five llmbar subsets
        acc[name] = 0.5
    acc["xstest-should-refuse"] = 1.0
    for name in ["refusals-dangerous", "refusals-offensive", "donotanswer"]:
        acc[name] = 0.5
    acc["math-prm"] = 1.0
    acc["shp"] = 1.0  # a prior set: in no section, ignored
    acc["model"] = "some/model"  # metadata as in the published files: ignored
    got = rewardbench_v1_sections(acc)
    # Chat: 100*1 / (100+95+95+28+40) = 100/358.
    chat = 100 / 358
    # Chat Hard: (37*1 + 0.5*(100+134+92+47+46)) / (37+419) = 246.5/456.
    chat_hard = 246.5 / 456
    # Safety: (154*1 + 250*0 + 0.5*(100+100+136)) / 740 = 322/740 (418/740 if xstest counts were swapped).
    safety = 322 / 740
    # Reasoning: 984*1 / (984 + 6*164) = 0.5: math and code weigh the same.
    reasoning = 0.5
    assert set(got) == {"Chat", "Chat Hard", "Safety", "Reasoning", "score"}
    assert got["Chat"] == pytest.approx(chat)
    assert got["Chat Hard"] == pytest.approx(chat_hard)
    assert got["Safety"] == pytest.approx(safety)
    assert got["Reasoning"] == pytest.approx(reasoning)
    assert got["score"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)


def test_rewardbench_v1_sections_only_present_sections():
    # Only two Chat subsets: (100*1.0 + 40*0.3) / 140 = 112/140 = 0.8; score = that one section.
    got = rewardbench_v1_sections({"alpacaeval-easy": 1.0, "mt-bench-med": 0.3, "other": 0.0})
    assert got == pytest.approx({"Chat": 0.8, "score": 0.8})
    with pytest.raises(SarmError):
        rewardbench_v1_sections({"other": 1.0})


def test_length_baseline_prefers_the_longer_response():
    pairs = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "subset": ["s", "s", "s"],
            "category": ["c", "c", "c"],
            "chosen": ["abcd", "a", "xyz"],
            "rejected": ["ab", "abc", "abc"],
        }
    )
    got = length_baseline(pairs)
    assert list(got.columns) == SCORE_COLUMNS
    assert got["score_chosen"].tolist() == [4.0, 1.0, 3.0]
    assert got["score_rejected"].tolist() == [2.0, 3.0, 3.0]
    # longer chosen wins; shorter chosen loses; equal lengths (3 vs 3) count as wrong: 1/3.
    assert subset_table(got)["accuracy"].tolist() == pytest.approx([1 / 3])
    with pytest.raises(SarmError, match="rejected"):
        length_baseline(pairs.drop(columns="rejected"))


def test_summarize_is_json_serialisable():
    scores = scores_frame([("hep-go", "Reasoning", 1.0, 0.0), ("hep-go", "Reasoning", 0.0, 1.0), ("mine", "local", 1.0, 0.0)])
    got = json.loads(json.dumps(summarize(scores, "m")))
    assert got["model"] == "m"
    assert got["n_pairs"] == 3
    assert got["accuracy"] == pytest.approx(2 / 3)  # 2 of 3 pairs right
    assert [r["subset"] for r in got["subsets"]] == ["hep-go", "mine"]  # "Reasoning" < "local"
    by_category = {r["category"]: r["accuracy"] for r in got["categories"]}
    # Reasoning 0.5, local 1.0, overall (0.5+1.0)/2 = 0.75 (pair accuracy is 2/3).
    assert by_category == pytest.approx({"Reasoning": 0.5, "local": 1.0, "overall": 0.75})


PER_SUBSET = sorted((REFERENCE / "rewardbench_v1_per_subset").glob("*.json"))


@pytest.mark.parametrize("path", PER_SUBSET, ids=lambda p: p.name)
def test_counts_match_published_subset_sizes(path):
    # Every published accuracy is k/size, so acc*count is whole for each subset except
    # math-prm (447 pairs, up-weighted to 984). Swapped xstest counts would fail here.
    acc = json.loads(path.read_text())
    for name, count in EXAMPLE_COUNTS.items():
        size = 447 if name == "math-prm" else count
        assert acc[name] * size == pytest.approx(round(acc[name] * size), abs=1e-6), name


def test_sections_reproduce_a_published_leaderboard_row():
    # Only mightbe/Better-PairRM has both per-subset accuracies and the same run on the
    # leaderboard: the general-preference/GPM-* files (reward-bench PR #201) are either
    # absent from the leaderboard (GPM-Gemma-2-2B, GPM-Gemma-2-9B, GPM-Llama-3.1-8B-Instruct)
    # or a different run of the model (GPM-Gemma-2B: Chat 0.785 vs 0.715 listed).
    path = REFERENCE / "rewardbench_v1_per_subset" / "mightbe__Better-PairRM.metrics.json"
    acc = json.loads(path.read_text())
    board = pd.read_csv(REFERENCE / "rewardbench_v1_leaderboard.csv")
    row = board.loc[board["model"] == acc["model"]].iloc[0]
    got = rewardbench_v1_sections(acc)
    # Listed: Chat 0.9553, Chat Hard 0.3925, Safety 0.8203, Reasoning 0.4983.
    for section in ["Chat", "Chat Hard", "Safety", "Reasoning"]:
        assert got[section] == pytest.approx(row[section], abs=0.005), section
    # The listed Score also folds in prior sets at half weight: (4 sections + 0.5*prior) / 4.5.
    assert (sum(got[s] for s in SECTIONS) + 0.5 * row["Prior Sets (0.5 weight)"]) / 4.5 == pytest.approx(row["Score"], abs=0.005)
    assert math.isclose(got["score"], sum(got[s] for s in SECTIONS) / 4)
