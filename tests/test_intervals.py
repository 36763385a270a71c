"""Bootstrap intervals of a model's score and of the difference between two models (sarm.intervals)."""

import numpy as np
import pandas as pd
import pytest
from test_rewardbench_v2 import grouped_scores

from sarm.ablations import variant_table
from sarm.intervals import bootstrap, interval, score_interval
from sarm.rewardbench import summarize
from sarm.tables import CI_ROWS, accuracy_table
from sarm.variants import specs_from_config


def local_scores(correct_by_category: dict[str, list[bool]], seed: int = 0) -> pd.DataFrame:
    rows = []
    for category, correct in correct_by_category.items():
        for i, ok in enumerate(correct):
            rows.append({"id": f"{category}{i}", "subset": category, "category": category, "score_chosen": 1.0 if ok else -1.0})
    return pd.DataFrame(rows).assign(score_rejected=0.0)


def test_the_interval_is_around_the_score_the_summary_reports():
    rng = np.random.default_rng(0)
    scores = local_scores({"chat": list(rng.random(40) < 0.8), "safety": list(rng.random(60) < 0.4)})
    score, low, high = score_interval(scores, draws=500)
    overall = {c["category"]: c["accuracy"] for c in summarize(scores, "m")["categories"]}["overall"]
    assert score == pytest.approx(overall)
    assert low < score < high and 0.05 < high - low < 0.3  # about +-1.96 x 0.05 for 100 pairs


def test_rewardbench2_interval_is_around_the_official_score():
    prompts = {("Math", f"m{i}"): ([3.0], [float(i % 4), 1.0, 0.0]) for i in range(12)}
    prompts |= {("Safety", f"s{i}"): ([2.0], [3.0 if i % 3 == 0 else 1.0, 0.0, 0.0]) for i in range(12)}
    scores = grouped_scores(prompts)
    score, low, high = score_interval(scores, draws=300)
    assert score == pytest.approx(summarize(scores, "m")["benchmark_scores"]["score"])
    assert low < score < high


def test_a_model_without_errors_has_a_point_interval_and_differences_are_paired():
    perfect = local_scores({"a": [True] * 10, "b": [True] * 10})
    half = local_scores({"a": [True] * 10, "b": [False] * 10})
    assert score_interval(perfect, draws=100) == (1.0, 1.0, 1.0)
    # the same resamples for both: b is always 0 vs 1, a always equal, so the difference is exactly 0.5
    points, values = bootstrap([perfect, half], draws=100)
    assert list(points) == [1.0, 0.5] and interval(values[0] - values[1]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="different pairs"):
        bootstrap([perfect, half.iloc[::-1]], draws=10)


def test_accuracy_table_carries_the_overall_interval():
    scores = local_scores({"chat": [True, False] * 10, "safety": [True] * 15 + [False] * 5})
    summary = summarize(scores, "m") | {"interval": dict(zip(("score", "low", "high"), score_interval(scores, draws=200)))}
    old = summarize(scores, "old")  # a summary written before intervals were recorded
    table = accuracy_table({"m": summary, "old": old}).set_index("category")
    assert list(table.index[-3:]) == ["overall", *CI_ROWS]
    assert table.loc[CI_ROWS[0], "m"] < table.loc["overall", "m"] < table.loc[CI_ROWS[1], "m"]
    assert table.loc[list(CI_ROWS), "old"].isna().all()


def test_variant_table_sets_every_model_beside_the_sarm_head():
    rng = np.random.default_rng(1)
    sarm = local_scores({"chat": list(rng.random(50) < 0.6), "safety": list(rng.random(50) < 0.6)})
    better = sarm.assign(score_chosen=1.0)
    specs = specs_from_config(
        {"reward_models": {"dense": {"features": "hidden"}, "sarm": {"features": "sae"}, "srm": {"mode": "sparse_rm"}}}
    )
    table = variant_table({"dense": {"t": sarm}, "sarm": {"t": sarm}, "srm": {"t": better}}, specs, draws=200)
    assert list(table["variant"]) == ["dense", "srm"] and set(table["reference"]) == {"sarm"}
    srm = table.set_index("variant").loc["srm"]
    assert srm["score_variant"] == 100 and srm["verdict"] == "higher" and srm["ci_low"] > 0
    dense = table.set_index("variant").loc["dense"]
    assert dense["difference"] == 0 and dense["verdict"] == "within noise"
    assert dense["ci_low_variant"] < dense["score_variant"] < dense["ci_high_variant"]
    no_reference = {k: v for k, v in specs.items() if k != "sarm"}
    assert variant_table({"dense": {"t": sarm}, "srm": {"t": better}}, no_reference).empty
