"""sarm.schema: the benchmark records drive scoring, labels and the paper tables' columns and overall scores."""

import pandas as pd
import pytest

from sarm.data import _check_spec, benchmark_of_spec, load_pairs
from sarm.errors import SarmError
from sarm.intervals import SCORE_DRAWS
from sarm.rewardbench import SCORERS, summarize
from sarm.schema import (
    BENCHMARK_COLUMN,
    BENCHMARKS,
    GROUP_COLUMNS,
    LOCAL,
    REWARDBENCH_2,
    REWARDBENCH_V1,
    SCORE_COLUMNS,
    benchmark,
)
from sarm.tables import leaderboard_rows, measured_on


def test_registry_and_records():
    assert list(BENCHMARKS) == ["rewardbench-v1", "rewardbench-2", "local"]
    assert benchmark("rewardbench-2") is REWARDBENCH_2 and benchmark("local") is LOCAL
    assert REWARDBENCH_2.columns == ("overall", "Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties")
    assert REWARDBENCH_V1.columns == ("overall", "Chat", "Chat Hard", "Safety", "Reasoning")
    assert (REWARDBENCH_2.full_size, REWARDBENCH_V1.full_size) == (1865, 2985)
    assert [b.official for b in BENCHMARKS.values()] == [True, True, False]
    for record in BENCHMARKS.values():  # every scoring rule has its summary and its paired comparison
        assert record.scoring in SCORERS and record.scoring in SCORE_DRAWS


def test_unknown_key_is_a_one_line_error():
    with pytest.raises(SarmError) as caught:
        benchmark("rewardbench-3")
    message = str(caught.value)
    assert message == "unknown benchmark 'rewardbench-3' (known: rewardbench-v1, rewardbench-2, local)"
    assert "\n" not in message
    with pytest.raises(SarmError, match="unknown benchmark None"):
        benchmark(None)
    with pytest.raises(SarmError, match="unknown benchmark 'nope'"):
        measured_on({"benchmark": "nope", "n_pairs": 3}, "t")
    with pytest.raises(SarmError, match="'benchmark' must be one of"):
        _check_spec("d", {"path": "x.jsonl", "format": "rewardbench", "benchmark": ["rewardbench-2"]})


def test_recognised_by_sources_and_format(tmp_path):
    assert benchmark_of_spec({"hub": "allenai/reward-bench-2", "split": "test", "format": "rewardbench2"}) == "rewardbench-2"
    assert benchmark_of_spec({"hub": "allenai/reward-bench-2", "split": "test", "format": "rewardbench"}) == "local"
    with pytest.raises(SarmError, match="'benchmark' rewardbench-2 needs 'format' rewardbench2"):
        _check_spec("d", {"path": "x.jsonl", "format": "rewardbench", "benchmark": "rewardbench-2"})
    _check_spec("d", {"path": "x.jsonl", "format": "chat", "benchmark": "rewardbench-v1"})  # v1: any format
    path = tmp_path / "rb.jsonl"
    row = '{"prompt": "p%d", "chosen": "good", "rejected": "bad", "subset": "donotanswer"}\n'
    path.write_text("".join(row % i for i in range(3)))
    official, _ = load_pairs("rb", {"path": str(path), "format": "rewardbench", "benchmark": "rewardbench-v1"})
    local, _ = load_pairs("rb", {"path": str(path), "format": "rewardbench"})
    assert official[BENCHMARK_COLUMN].tolist() == ["rewardbench-v1"] * 3 and BENCHMARK_COLUMN not in local


def v1_scores():
    """Two RewardBench v1 subsets of one section each: Chat 3/4 right (alpacaeval-easy), Safety 1/2 (donotanswer)."""
    rows = [("alpacaeval-easy", "Chat", c, r) for c, r in [(1, 0), (1, 0), (1, 0), (0, 1)]]
    rows += [("donotanswer", "Safety", c, r) for c, r in [(1, 0), (0, 0)]]
    table = pd.DataFrame(rows, columns=["subset", "category", "score_chosen", "score_rejected"])
    return table.assign(id=[f"p{i}" for i in range(len(rows))], benchmark="rewardbench-v1")[[*SCORE_COLUMNS, "benchmark"]]


def v2_scores():
    """Two best-of-4 Factuality prompts: g1's correct answer wins (1), g2's ties one incorrect for the top (1/2)."""
    rows = []
    for group, chosen, rejected in [("g1", 2.0, [1.0, 0.5, 1.5]), ("g2", 1.0, [1.0, 0.0, 0.0])]:
        for k, score in enumerate(rejected):
            rows.append(
                {
                    "id": f"{group}/{k}",
                    "subset": "Factuality",
                    "category": "Factuality",
                    "score_chosen": chosen,
                    "score_rejected": score,
                    "group": group,
                    "chosen_index": 0,
                    "rejected_index": k,
                }
            )
    return pd.DataFrame(rows).assign(benchmark="rewardbench-2")[[*SCORE_COLUMNS, *GROUP_COLUMNS, "benchmark"]]


def test_records_score_a_small_table_as_before():
    v1 = summarize(v1_scores(), "m")
    # before the records: sections weighted by EXAMPLE_COUNTS (one subset each), overall their mean
    assert v1["benchmark"] == "rewardbench-v1" and v1["complete"] is False
    assert v1["benchmark_scores"] == {"Chat": 0.75, "Safety": 0.5, "score": 0.625}

    v2 = summarize(v2_scores(), "m")
    assert v2["benchmark"] == "rewardbench-2" and v2["n_prompts"] == {"Factuality": 2} and v2["complete"] is False
    assert v2["benchmark_scores"] == {"Factuality": 0.75, "score": 0.75}
    assert "ties" not in v2

    local = summarize(v1_scores().drop(columns="benchmark"), "m")
    assert local["benchmark"] == "local" and local["complete"] is None
    assert local["benchmark_scores"] == {"Chat": 0.75, "Safety": 0.5, "overall": 0.625}

    assert measured_on(v2, "rb2") == "RewardBench 2 (official, reproduced, subsample, 2 of 1,865 prompts)"
    assert measured_on(v1, "rb") == "RewardBench v1 (official, reproduced, subsample, 6 of 2,985 pairs)"
    assert measured_on(v1, "rb", stand_in=True).startswith("RewardBench v1 stand-in (miniature, 6 pairs from")
    assert measured_on(local, "val") == "val (local, 6 pairs)"


def test_leaderboard_overall_from_the_records(tmp_path):
    row = {
        "model": "m",
        "Score": 0.77,
        "Factuality": 0.9,
        "Precise IF": 0.4,
        "Math": 0.6,
        "Safety": 0.8,
        "Focus": 0.7,
        "Ties": 0.5,
        "Chat": 0.9,
        "Chat Hard": 0.5,
        "Reasoning": 0.6,
    }
    path = tmp_path / "board.csv"
    pd.DataFrame([row]).to_csv(path, index=False)
    rb2 = leaderboard_rows(path, ["m"], "rewardbench-2").iloc[0]
    v1 = leaderboard_rows(path, ["m"], "rewardbench-v1").iloc[0]
    assert rb2["overall"] == 77.0  # the board's Score
    assert v1["overall"] == 70.0  # the mean of the four sections: (90 + 50 + 80 + 60) / 4
    assert (rb2["data set"], v1["data set"]) == ("RewardBench 2 (official, published)", "RewardBench v1 (official, published)")
    with pytest.raises(SarmError, match="'local' has no published leaderboard"):
        leaderboard_rows(path, ["m"], "local")
