"""Bootstrap intervals of a reward model's benchmark score, alone or as a difference between two models.

The score is the one the accuracy tables report: on RewardBench 2 the official score (best-of-4 per prompt, the
Ties formula, the mean of the six subsets; prompts resampled within subsets, a Ties prompt's ref and tied groups
together), elsewhere the mean of the categories' pair accuracies (RewardBench v1 subsets at their official
weights; pairs resampled within categories). Models compared are scored on the same resamples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from sarm.rewardbench import benchmark_of, pair_correct, rewardbench2_prompts, rewardbench2_subset_scores
from sarm.schema import EXAMPLE_COUNTS, benchmark

DRAWS = 2000
LEVEL = 95  # %


def pair_weights(scores: pd.DataFrame) -> np.ndarray:
    """Per-pair weights that make the weighted mean of a category the accuracy table's category score: a subset
    counts with its official RewardBench v1 size where it is an official subset, else with its own size."""
    counts = scores.groupby("subset")["subset"].transform("size").to_numpy(dtype=float)
    official = scores["subset"].map(EXAMPLE_COUNTS).to_numpy(dtype=float)
    return np.where(np.isnan(official), counts, official) / counts


def category_mean_accuracy(correct: np.ndarray, categories: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The tables' overall score: the mean over categories of each category's (weighted) pair accuracy."""
    weights = np.ones(len(correct)) if weights is None else weights
    return float(np.mean([np.average(correct[categories == c], weights=weights[categories == c]) for c in np.unique(categories)]))


def _category_draws(correct: np.ndarray, categories: np.ndarray, weights: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """[models, draws]: `category_mean_accuracy` of each row of `correct` ([models, pairs]) on `draws` resamples
    of the pairs within each category (one resample for every model)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(categories == c) for c in np.unique(categories)]
    out = np.empty((len(correct), draws))
    for i in range(draws):
        picks = [rng.choice(g, size=len(g)) for g in groups]
        out[:, i] = np.mean([(correct[:, p] * weights[p]).sum(1) / weights[p].sum() for p in picks], axis=0)
    return out


def pair_draws(frames: list[pd.DataFrame], draws: int = DRAWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(each model's score [models], its bootstrap scores [models, draws]) on a table scored pair by pair."""
    categories, weights = frames[0]["category"].to_numpy(), pair_weights(frames[0])
    correct = np.stack([pair_correct(f["score_chosen"], f["score_rejected"]).astype(float) for f in frames])
    points = np.array([category_mean_accuracy(c, categories, weights) for c in correct])
    return points, _category_draws(correct, categories, weights, draws, seed)


def rewardbench2_draws(frames: list[pd.DataFrame], draws: int = DRAWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(each model's official RewardBench 2 score, its bootstrap scores [models, draws]): prompts resampled within
    each subset. A draw whose Ties subset has no prompt with both groups scores NaN (as the official score)."""
    prompts = [rewardbench2_prompts(f) for f in frames]
    if any(p[["subset", "prompt"]].values.tolist() != prompts[0][["subset", "prompt"]].values.tolist() for p in prompts):
        raise ValueError("the models were scored on different RewardBench 2 prompts")
    points = np.array([rewardbench2_subset_scores(p)["score"] for p in prompts])
    rng = np.random.default_rng(seed)
    subsets = prompts[0]["subset"].to_numpy()
    groups = [np.flatnonzero(subsets == s) for s in pd.unique(subsets)]
    out = np.empty((len(frames), draws))
    for i in range(draws):
        counts = sum(np.bincount(rng.choice(g, size=len(g)), minlength=len(subsets)) for g in groups)
        out[:, i] = [rewardbench2_subset_scores(p, counts)["score"] for p in prompts]
    return points, out


# A benchmark's scoring rule (`sarm.schema.Benchmark.scoring`) -> the bootstrap of its score.
SCORE_DRAWS: dict[str, Callable] = {"best_of_n": rewardbench2_draws, "sections": pair_draws, "pairs": pair_draws}


def bootstrap(frames: list[pd.DataFrame], draws: int = DRAWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(each model's score [models], its scores on `draws` resamples [models, draws]) of score tables of the same
    examples, scored and resampled as their benchmark is (the same resamples for every model)."""
    if any(f["id"].tolist() != frames[0]["id"].tolist() for f in frames):
        raise ValueError("the models were scored on different pairs")
    return SCORE_DRAWS[benchmark(benchmark_of(frames[0])).scoring](frames, draws, seed)


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile interval of bootstrap values (NaN draws left out)."""
    if np.isnan(values).all():  # e.g. RewardBench 2's Ties without a prompt that has both groups
        return float("nan"), float("nan")
    tail = (100 - LEVEL) / 2
    return float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))


def score_interval(scores: pd.DataFrame, draws: int = DRAWS, seed: int = 0) -> tuple[float, float, float]:
    """(score, 95 % interval low, high) of one model's per-example score table, scored as its benchmark is."""
    points, values = bootstrap([scores], draws, seed)
    return (float(points[0]), *interval(values[0]))


def interval_summary(scores: pd.DataFrame, draws: int = DRAWS, seed: int = 0) -> dict:
    """What an evaluation's summary.json records of its score's interval (`score_interval`)."""
    score, low, high = score_interval(scores, draws, seed)
    return {"score": score, "low": low, "high": high, "level": LEVEL, "draws": draws, "seed": seed}
