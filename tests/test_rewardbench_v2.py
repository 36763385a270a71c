"""RewardBench 2 and official RewardBench v1 as data sets: loaders (files shaped like the hub's, an offline mirror),
grouped pair tables, and the official scores worked by hand."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sarm.data import (
    COLUMNS,
    OPTIONAL_COLUMNS,
    benchmark_of_spec,
    cap_per_subset,
    load_pairs,
    read_pairs,
    write_pairs,
)
from sarm.errors import SarmError
from sarm.evaluate import score_cached
from sarm.rewardbench import (
    SECTIONS,
    V2_PROMPTS,
    best_of_n,
    length_baseline,
    rewardbench2_prompts,
    rewardbench2_subset_scores,
    summarize,
    ties_score,
)
from sarm.schema import V1_PAIRS

RB2_HUB = {"hub": "allenai/reward-bench-2", "split": "test", "format": "rewardbench2"}
RB1_HUB = {"hub": "allenai/reward-bench", "split": "filtered", "format": "rewardbench"}


def rb2_row(row_id, subset, chosen, rejected, **extra):
    """A row shaped like allenai/reward-bench-2 (split test)."""
    return {
        "id": row_id,
        "prompt": f"prompt of {row_id}",
        "chosen": chosen,
        "rejected": rejected,
        "num_correct": len(chosen),
        "num_incorrect": len(rejected),
        "total_completions": len(chosen) + len(rejected),
        "models": ["model-a"] * (len(chosen) + len(rejected)),
        "subset": subset,
        "additional_metadata": {
            "category": "c",
            "correct": None,
            "index": 1.0,
            "instruction_id_list": [],
            "label": None,
            "method": None,
            "models": [],
            "prompt_norm": None,
            "subcategory": None,
            "valid": None,
        },
        **extra,
    }


# Lengths make the length baseline's scores: each response scores its length in characters.
RB2_ROWS = [
    # Factuality: chosen (4) beats 1, 2, 3 -> 1.
    rb2_row("0", "Factuality", ["aaaa"], ["a", "bb", "ccc"]),
    # Precise IF: chosen (2) ties one rejected at the top -> 1/2.
    rb2_row("1", "Precise IF", ["aa"], ["bb", "a", "c"]),
    # Ties, prompt 4: ref has 1 correct (2) vs 1 incorrect (1); tied has 2 correct (3, 3) vs 3 incorrect (1, 1, 1).
    rb2_row("ref:4", "Ties", ["xx"], ["y"]),
    rb2_row("tied:4", "Ties", ["xxx", "zzz"], ["y", "w", "v"]),
]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def rb2_pairs(offline, tmp_path):
    mirror = tmp_path / "mirror"
    write_parquet(mirror / "allenai" / "reward-bench-2" / "data" / "test-00000-of-00001.parquet", RB2_ROWS)
    return load_pairs("rb2", RB2_HUB, mirror=str(mirror))


# --- loading ---------------------------------------------------------------------------------------------------


def test_rewardbench2_mirror_rows_become_grouped_pairs(rb2_pairs):
    table, report = rb2_pairs
    # max(c, r) pairs per row: 3 + 3 + 1 + 3 = 10.
    assert report == {"rows_read": 4, "pairs_kept": 10, "skipped": {}}
    assert list(table.columns) == [*COLUMNS, *OPTIONAL_COLUMNS]
    tied = table[table["group"] == "tied:4"]
    assert tied["id"].tolist() == ["tied:4/0", "tied:4/1", "tied:4/2"]
    # pair k = (chosen[k % 2], rejected[k % 3]): every completion at least once.
    assert tied["chosen_index"].tolist() == [0, 1, 0]
    assert tied["rejected_index"].tolist() == [0, 1, 2]
    assert tied["chosen"].tolist() == ["xxx", "zzz", "xxx"] and tied["rejected"].tolist() == ["y", "w", "v"]
    assert tied["prompt"].iloc[0] == [{"role": "user", "content": "prompt of tied:4"}]
    assert set(table["benchmark"]) == {"rewardbench-2"}
    assert table.set_index("group")["category"].to_dict()["0"] == "Factuality"


def test_grouped_pairs_round_trip_with_optional_columns(rb2_pairs, tmp_path):
    table, _ = rb2_pairs
    write_pairs(table, tmp_path / "rb2.parquet")
    back = read_pairs(tmp_path / "rb2.parquet")
    assert list(back.columns) == [*COLUMNS, *OPTIONAL_COLUMNS]
    pd.testing.assert_frame_equal(back.drop(columns="prompt"), table.drop(columns="prompt"), check_dtype=False)


def test_rewardbench2_scores_by_hand_through_the_length_baseline(rb2_pairs):
    table, _ = rb2_pairs
    scores = length_baseline(table)
    assert {"group", "chosen_index", "rejected_index", "benchmark"} <= set(scores.columns)  # passed through
    got = summarize(scores, "length")
    assert got["benchmark"] == "rewardbench-2"
    assert got["n_prompts"] == {"Factuality": 1, "Precise IF": 1, "Ties": 2}
    assert got["complete"] is False  # 4 of 1,865 prompts
    # Ties: ref margin 2-1 = 1 (accurate), tied margin 3-1 = 2 (accurate), spread 3-3 = 0:
    # correctness_preferred 2 > 0, _hard min(1, 2) = 1 > 0, margin tanh(1/0 - 1) = tanh(inf) = 1
    # -> 0.3 + 0.3 + 0.2 + 0.2 + 0.01 = 1.01 (the official maximum).
    scores_v2 = got["benchmark_scores"]
    assert scores_v2 == pytest.approx({"Factuality": 1.0, "Precise IF": 0.5, "Ties": 1.01, "score": (1.0 + 0.5 + 1.01) / 3})
    assert json.loads(json.dumps(got)) == got


def test_rewardbench_v1_mirror_rows_take_their_section(offline, tmp_path):
    rows = [
        {
            "prompt": "q0",
            "chosen": "good",
            "chosen_model": "m1",
            "rejected": "bad",
            "rejected_model": "m2",
            "subset": "alpacaeval-easy",
            "id": 30,
        },
        {
            "prompt": "q1",
            "chosen": "good",
            "chosen_model": "m1",
            "rejected": "bad",
            "rejected_model": "m2",
            "subset": "llmbar-adver-GPTOut",
            "id": 31,
        },
        {
            "prompt": "q2",
            "chosen": "good",
            "chosen_model": "m1",
            "rejected": "bad",
            "rejected_model": "m2",
            "subset": "hep-rust",
            "id": 32,
        },
        {
            "prompt": "q3",
            "chosen": "good",
            "chosen_model": "m1",
            "rejected": "bad",
            "rejected_model": "m2",
            "subset": "my-own-subset",
            "id": 33,
        },
    ]
    mirror = tmp_path / "mirror"
    write_parquet(mirror / "allenai" / "reward-bench" / "data" / "filtered-00000-of-00001.parquet", rows)
    table, report = load_pairs("reward-bench", RB1_HUB, mirror=str(mirror))
    assert report["pairs_kept"] == 4
    assert table["id"].tolist() == ["30", "31", "32", "33"]
    assert table["category"].tolist() == ["Chat", "Chat Hard", "Reasoning", "my-own-subset"]
    assert set(table["benchmark"]) == {"rewardbench-v1"}
    # A config category still wins over the section.
    table, _ = load_pairs("reward-bench", {**RB1_HUB, "category": "all"}, mirror=str(mirror))
    assert set(table["category"]) == {"all"}


def test_benchmark_is_inferred_or_configured():
    assert benchmark_of_spec(RB2_HUB) == "rewardbench-2"
    assert benchmark_of_spec(RB1_HUB) == "rewardbench-v1"
    assert benchmark_of_spec({**RB1_HUB, "split": "raw"}) == "local"  # not the benchmark's split
    assert benchmark_of_spec({"path": "rb_like.jsonl", "format": "rewardbench"}) == "local"
    assert benchmark_of_spec({"path": "rb2.parquet", "format": "rewardbench2", "benchmark": "rewardbench-2"}) == "rewardbench-2"
    with pytest.raises(SarmError, match="'benchmark' rewardbench-2 needs 'format' rewardbench2"):
        load_pairs("x", {"path": "a.jsonl", "format": "rewardbench", "benchmark": "rewardbench-2"})


def test_local_tables_stay_without_optional_columns(tmp_path):
    rows = [{"id": "a", "prompt": "q", "chosen": "c", "rejected": "r", "subset": "hep-go"}]
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, _ = load_pairs("local", {"path": str(path), "format": "rewardbench"})
    assert list(table.columns) == COLUMNS
    write_pairs(table, tmp_path / "local.parquet")
    assert list(read_pairs(tmp_path / "local.parquet").columns) == COLUMNS
    assert summarize(length_baseline(table), "length")["benchmark"] == "local"


@pytest.mark.parametrize("fmt, missing", [("rewardbench2", "rejected"), ("rewardbench2", "id"), ("rewardbench", "subset")])
def test_missing_required_column_is_one_line_naming_column_and_file(tmp_path, fmt, missing):
    rows = [{k: v for k, v in rb2_row("0", "Math", ["a"], ["b"]).items() if k != missing}]
    path = write_parquet(tmp_path / "bench.parquet", rows)
    with pytest.raises(SarmError, match=rf"column '{missing}' missing from .*bench\.parquet") as error:
        load_pairs("bench", {"path": str(path), "format": fmt})
    assert "\n" not in str(error.value)


def test_rewardbench2_bad_rows_are_skipped_and_counted(tmp_path):
    rows = [
        rb2_row("0", "Math", ["a"], ["b", "c"]),
        {**rb2_row("1", "Math", ["a"], ["b"]), "num_correct": 2},  # counts disagree with the lists
        rb2_row("2", "Math", [], ["b"]),  # no correct completion
        {**rb2_row("3", "Math", ["a"], ["b"]), "rejected": "b"},  # not a list
    ]
    path = tmp_path / "rb2.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table, report = load_pairs("rb2", {"path": str(path), "format": "rewardbench2"})
    assert report["skipped"] == {"counts_disagree": 1, "missing_response": 1, "malformed_completions": 1}
    assert table["group"].tolist() == ["0", "0"]
    assert "benchmark" not in table.columns  # a local file in RewardBench 2 shape is a local set


def test_caps_keep_whole_prompts_and_link_ties(rb2_pairs):
    table, _ = rb2_pairs
    more = table.assign(group=table["group"] + "x", id=table["id"] + "x")
    more["group"] = more["group"].str.replace(r"^(ref|tied):4x$", r"\1:5", regex=True)
    both = pd.concat([table, more], ignore_index=True)
    capped = cap_per_subset(both, 1, seed=3)
    # One prompt per subset, each with all its pairs; ref:n and tied:n count as one prompt.
    assert capped.groupby("subset")["group"].nunique().to_dict() == {"Factuality": 1, "Precise IF": 1, "Ties": 2}
    ties = set(capped.loc[capped["subset"] == "Ties", "group"])
    assert ties in ({"ref:4", "tied:4"}, {"ref:5", "tied:5"})
    assert capped.groupby("group").size().to_dict() == both[both["group"].isin(capped["group"])].groupby("group").size().to_dict()
    assert cap_per_subset(both, None, seed=3) is both


# --- official scores, worked by hand ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ([3.0], [1.0, 2.0, 0.0], 1.0),  # strictly top
        ([3.0], [3.0, 1.0, 0.0], 1 / 2),  # 2-way tie at the top
        ([3.0], [3.0, 3.0, 0.0], 1 / 3),  # 3-way tie
        ([1.0], [1.0, 1.0, 1.0], 1 / 4),  # all four equal
        ([2.0], [3.0, 2.0, 0.0], 0.0),  # beaten
        ([np.nan], [1.0, 2.0, 3.0], 0.0),  # no score
    ],
)
def test_best_of_n(chosen, rejected, expected):
    assert best_of_n(chosen, rejected) == pytest.approx(expected)


def grouped_scores(prompts, benchmark="rewardbench-2"):
    """Score table from {(subset, group): (correct scores, incorrect scores)}, one pair per (i % c, i % r)."""
    rows = []
    for (subset, group), (correct, incorrect) in prompts.items():
        for k in range(max(len(correct), len(incorrect))):
            c, r = k % len(correct), k % len(incorrect)
            rows.append(
                {
                    "id": f"{group}/{k}",
                    "subset": subset,
                    "category": subset,
                    "score_chosen": correct[c],
                    "score_rejected": incorrect[r],
                    "group": group,
                    "chosen_index": c,
                    "rejected_index": r,
                    "benchmark": benchmark,
                }
            )
    return pd.DataFrame(rows)


def test_best_of_4_subset_is_the_mean_over_prompts():
    # Four Math prompts scoring 1, 1/2, 1/3 and 0: (1 + 0.5 + 1/3 + 0) / 4 = 11/24.
    scores = grouped_scores(
        {
            ("Math", "a"): ([3.0], [1.0, 2.0, 0.0]),
            ("Math", "b"): ([3.0], [3.0, 1.0, 0.0]),
            ("Math", "c"): ([3.0], [3.0, 3.0, 0.0]),
            ("Math", "d"): ([2.0], [3.0, 2.0, 0.0]),
        }
    )
    got = summarize(scores, "m")
    assert got["benchmark_scores"]["Math"] == pytest.approx(11 / 24)
    assert got["n_prompts"] == {"Math": 4}


def test_a_completion_scored_in_several_pairs_keeps_one_score():
    """The chosen completion of a best-of-4 prompt is in all three pairs; the mean of its three equal scores,
    3 x 0.1 / 3 = 0.10000000000000002, outscored a rejected 0.1 that the official code counts as a tie."""
    scores = grouped_scores(
        {
            ("Math", "a"): ([0.1], [0.1, 0.0, -1.0]),  # official: a 2-way tie at the top -> 1/2
            ("Ties", "ref:1"): ([0.1], [0.1, 0.0, -1.0]),  # margin 0.1 - 0.1 = 0: not accurate
            ("Ties", "tied:1"): ([0.9, 0.8], [0.1]),
        }
    )
    got = summarize(scores, "m")
    assert got["benchmark_scores"]["Math"] == 0.5
    assert got["ties"]["ref_accuracy"] == 0.0 and got["ties"]["tied_accuracy"] == 1.0


def test_prompt_weights_score_as_the_prompts_repeated():
    """`rewardbench2_subset_scores` with counts (a bootstrap resample) equals the official score of a table in
    which each prompt appears that many times."""
    rng = np.random.default_rng(0)
    prompts = {}
    for subset in ["Math", "Focus"]:
        for g in range(5):
            prompts[(subset, f"{subset}{g}")] = (
                rng.integers(0, 4, 1).astype(float).tolist(),
                rng.integers(0, 4, 3).astype(float).tolist(),
            )
    for n in range(1, 6):
        prompts[("Ties", f"ref:{n}")] = ([float(rng.integers(0, 5))], rng.normal(size=3).round(1).tolist())
        if n != 5:  # prompt 5 has a ref group only
            prompts[("Ties", f"tied:{n}")] = (rng.normal(2, 1, size=2).round(1).tolist(), rng.normal(size=2).round(1).tolist())
    table = grouped_scores(prompts)
    units = rewardbench2_prompts(table)
    weights = rng.integers(0, 3, len(units))
    for subset in ("Math", "Focus"):  # no subset left empty
        weights[np.flatnonzero(units["subset"].to_numpy() == subset)[0]] = 1
    weights[np.flatnonzero(units["prompt"].to_numpy() == "1")[0]] = 1  # a Ties prompt with both groups
    repeated = {}
    for unit, count in zip(units.itertuples(), weights):
        for copy in range(count):
            if unit.subset == "Ties":  # ref:n and tied:n become ref:m and tied:m, m = 100 n + copy
                for kind in ("ref", "tied"):
                    if ("Ties", f"{kind}:{unit.prompt}") in prompts:
                        m = int(unit.prompt) * 100 + copy
                        repeated[("Ties", f"{kind}:{m}")] = prompts[("Ties", f"{kind}:{unit.prompt}")]
            else:
                repeated[(unit.subset, f"{unit.prompt}/{copy}")] = prompts[(unit.subset, unit.prompt)]
    expected = summarize(grouped_scores(repeated), "m")["benchmark_scores"]
    assert rewardbench2_subset_scores(units, weights) == pytest.approx(expected)
    assert rewardbench2_subset_scores(units) == pytest.approx(summarize(table, "m")["benchmark_scores"])


def completions(prompts):
    rows = [
        {"subset": "Ties", "group": g, "correct": True, "index": i, "score": s}
        for g, (c, _) in prompts.items()
        for i, s in enumerate(c)
    ]
    rows += [
        {"subset": "Ties", "group": g, "correct": False, "index": i, "score": s}
        for g, (_, w) in prompts.items()
        for i, s in enumerate(w)
    ]
    return pd.DataFrame(rows)


def test_ties_official_formula_by_hand():
    got = ties_score(
        completions(
            {
                # prompt 1: ref margin 5-4 = 1 (accurate); tied spread 6-5.5 = 0.5, margin 5.5-4.5 = 1 (accurate).
                "ref:1": ([5.0], [3.0, 4.0]),
                "tied:1": ([6.0, 5.5], [2.0, 4.5]),
                # prompt 2: ref margin 1-2 = -1 (wrong); tied spread 4-2 = 2, margin 2-1 = 1 (accurate).
                "ref:2": ([1.0], [2.0]),
                "tied:2": ([4.0, 2.0], [1.0]),
                # prompt 3: a ref without its tied group counts in ref accuracy only.
                "ref:3": ([3.0], [1.0]),
            }
        )
    )
    # ref accuracy 2/3, tied accuracy 2/2.
    assert got["ref_accuracy"] == pytest.approx(2 / 3) and got["tied_accuracy"] == 1.0
    # Shared prompts 1 and 2: preferred 1 > 0.5 yes, 1 > 2 no -> 1/2; hard min(1, 1) > 0.5 yes, min(-1, 1) > 2 no -> 1/2.
    assert got["shared_prompts"] == 2
    assert got["correctness_preferred"] == 0.5 and got["correctness_preferred_hard"] == 0.5
    # Margin: tanh(1/0.5 - 1) = tanh(1) = 0.761594, tanh(-1/2 - 1) = tanh(-1.5) = -0.905148 -> mean -0.071777.
    margin = (math.tanh(1.0) + math.tanh(-1.5)) / 2
    assert got["correctness_margin_score"] == pytest.approx(margin) == pytest.approx(-0.071777, abs=1e-6)
    # 0.3 * 1 + 0.3 * 2/3 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * (-0.071777) = 0.7 - 0.00071777 = 0.699282.
    assert got["score"] == pytest.approx(0.7 + 0.01 * margin) == pytest.approx(0.699282, abs=1e-6)


def test_ties_zero_spread_follows_the_official_code():
    # spread 0: margin 0/0 is NaN -> 0 (nan_to_num), while x/0 for x > 0 is +inf -> tanh = 1.
    got = ties_score(completions({"ref:1": ([1.0], [1.0]), "tied:1": ([2.0, 2.0], [2.0])}))
    # ref margin 0 (not accurate), tied margin 0 (not accurate); 0 > 0 false twice; min(0, 0)/0 = NaN -> 0.
    assert got["score"] == 0.0
    with pytest.raises(SarmError, match="'tied:1' has a single correct completion"):
        ties_score(completions({"ref:1": ([1.0], [0.0]), "tied:1": ([2.0], [0.0])}))
    with pytest.raises(SarmError, match="expected an id 'ref:<n>' or 'tied:<n>'"):
        ties_score(completions({"7": ([1.0], [0.0])}))


def test_overall_is_the_mean_of_the_six_subsets_and_complete_needs_every_prompt():
    scores = grouped_scores(
        {
            ("Factuality", "f"): ([3.0], [1.0, 2.0, 0.0]),  # 1
            ("Precise IF", "p"): ([3.0], [3.0, 1.0, 0.0]),  # 1/2
            ("Math", "m"): ([0.0], [1.0, 2.0, 3.0]),  # 0
            ("Safety", "s"): ([9.0], [1.0, 2.0, 3.0]),  # 1
            ("Focus", "o"): ([1.0], [1.0, 1.0, 1.0]),  # 1/4
            ("Ties", "ref:1"): ([2.0], [1.0]),  # Ties 1.01 (zero spread, as above)
            ("Ties", "tied:1"): ([3.0, 3.0], [1.0]),
        }
    )
    got = summarize(scores, "m")["benchmark_scores"]
    assert got["Ties"] == pytest.approx(1.01)
    # (1 + 0.5 + 0 + 1 + 0.25 + 1.01) / 6 = 3.76 / 6.
    assert got["score"] == pytest.approx(3.76 / 6)
    assert V2_PROMPTS == {"Factuality": 475, "Precise IF": 160, "Math": 183, "Safety": 450, "Focus": 495, "Ties": 102}
    assert sum(V2_PROMPTS.values()) == 1865


def test_rewardbench2_rejects_foreign_subsets_and_mixed_benchmarks():
    scores = grouped_scores({("Chat", "a"): ([1.0], [0.0])})
    with pytest.raises(SarmError, match="'Chat' is not a RewardBench 2 subset"):
        summarize(scores, "m")
    mixed = pd.concat(
        [
            grouped_scores({("Math", "a"): ([1.0], [0.0])}),
            grouped_scores({("Math", "b"): ([1.0], [0.0])}, benchmark="rewardbench-v1"),
        ]
    )
    with pytest.raises(SarmError, match="mixes benchmarks"):
        summarize(mixed, "m")


def test_rewardbench_v1_summary_gives_sections_and_completeness():
    # Every official subset at its real size, all right except math-prm (all wrong):
    # Reasoning = (984 * 0 + 6 * 164 * 1) / (984 + 984) = 0.5; the other sections 1; score = 3.5 / 4.
    rows = []
    for subset, n in V1_PAIRS.items():
        right = subset != "math-prm"
        rows += [
            {
                "id": f"{subset}-{i}",
                "subset": subset,
                "category": "x",
                "score_chosen": float(right),
                "score_rejected": 0.5,
                "benchmark": "rewardbench-v1",
            }
            for i in range(n)
        ]
    scores = pd.DataFrame(rows)
    scores["category"] = scores["subset"].map({s: section for section, names in SECTIONS.items() for s in names})
    got = summarize(scores, "m")
    assert got["benchmark"] == "rewardbench-v1" and got["complete"] is True and got["n_pairs"] == 2985
    assert got["benchmark_scores"] == pytest.approx(
        {"Chat": 1.0, "Chat Hard": 1.0, "Safety": 1.0, "Reasoning": 0.5, "score": 0.875}
    )
    assert summarize(scores.iloc[:-1], "m")["complete"] is False


def test_score_cached_passes_the_grouping_through(rb2_pairs):
    table, _ = rb2_pairs

    class Cache:  # the two things score_cached reads of an ActivationCache
        folder = "cache"
        index = pd.DataFrame({"id": np.repeat(table["id"].to_numpy(), 2), "side": ["chosen", "rejected"] * len(table)})

        def final(self):
            return torch.zeros(2 * len(table), 1)

    class Model:  # what score_cached asks of a reward model
        def score_cache(self, cache):
            return torch.arange(len(cache.final()), dtype=torch.float32), {}

    got = score_cached(Model(), Cache(), table)
    assert list(got.columns) == ["id", "subset", "category", "score_chosen", "score_rejected", *OPTIONAL_COLUMNS]
    assert got["score_chosen"].tolist() == list(range(0, 2 * len(table), 2))
    assert got["group"].tolist() == table["group"].tolist()
