"""Do the paper's orderings hold here? Each claim compares two reward models that differ in one respect, on the
same pairs, with a paired, category-stratified bootstrap interval on the score difference. The score is the one
the paper's tables report: on RewardBench 2 the official score (best-of-4 per prompt, the Ties formula, the mean
of the six subsets; prompts resampled within subsets), elsewhere the accuracy tables' overall.

The models of a comparison are found by their config spec (features, mode, sae, topk), not by their names, so
any config that trains the two variants gets the comparison.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sarm.rewardbench import (
    benchmark_of,
    pair_correct,
    rewardbench2_prompts,
    rewardbench2_subset_scores,
)
from sarm.schema import EXAMPLE_COUNTS, benchmark
from sarm.variants import RewardModelSpec

# (claim, the paper's winner, the loser): each a spec the reward model must match; `None` matches anything.
CLAIMS: list[tuple[str, dict, dict]] = [
    (
        "trained SAE encoder > random-init encoder (Table 2)",
        {"features": "sae", "sae": "sequence", "topk": True},
        {"features": "sae", "sae": "random", "topk": True},
    ),
    (
        "sequence-level SAE > token-level SAE (Table 2)",
        {"features": "sae", "sae": "sequence", "topk": True},
        {"features": "sae", "sae": "token", "topk": True},
    ),
    ("SARM head >= dense head on the same layer", {"features": "sae", "sae": "sequence", "topk": True}, {"features": "hidden"}),
    ("fine-tuned > frozen backbone (the paper fine-tunes)", {"mode": "finetune"}, {"mode": "frozen"}),
    (
        "TopK on >= off (the paper keeps TopK; its public recipe turns it off)",
        {"features": "sae", "sae": "sequence", "topk": True},
        {"features": "sae", "sae": "sequence", "topk": False},
    ),
    (
        "SARM (truncated at L) >= a full-depth BT reward model (Table 1: SARM-4B above Skywork-8B)",
        {"features": "sae", "sae": "sequence", "topk": True},
        {"mode": "full_depth"},
    ),
]
COLUMNS = [
    "claim",
    "table",
    "winner_by_paper",
    "loser_by_paper",
    "score_winner",
    "score_loser",
    "difference",
    "ci_low",
    "ci_high",
    "verdict",
]


def comparisons(specs: dict[str, RewardModelSpec]) -> list[tuple[str, str, str]]:
    """(claim, winner, loser) for every pair of trained models that a claim compares. The two must be trained
    the same way unless the claim is about the training mode; a mode claim between two heads over features keeps
    the head's features fixed (a sequence classifier has none to keep)."""
    out = []
    for claim, win, lose in CLAIMS:
        about_mode = "mode" in win or "mode" in lose
        for a, spec_a in specs.items():
            for b, spec_b in specs.items():
                if a == b or not (spec_a.matches(win) and spec_b.matches(lose)):
                    continue
                if not (spec_a.linear_head and spec_b.linear_head):  # the claims are about linear (BT) heads
                    continue
                if not about_mode and spec_a.kind != spec_b.kind:
                    continue
                if about_mode and spec_a.feature_head and spec_b.feature_head and not _same_head(spec_a, spec_b):
                    continue
                out.append((claim, a, b))
    return out


def _same_head(a: RewardModelSpec, b: RewardModelSpec) -> bool:
    return (a.features, a.sae, a.topk) == (b.features, b.sae, b.topk)


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


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    categories: np.ndarray,
    draws: int = 2000,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """95 % interval of score(a) - score(b), resampling pairs within each category (the same draw for both)."""
    rng = np.random.default_rng(seed)
    weights = np.ones(len(correct_a)) if weights is None else weights
    groups = [np.flatnonzero(categories == c) for c in np.unique(categories)]
    diffs = np.empty(draws)
    for i in range(draws):
        picks = [rng.choice(g, size=len(g)) for g in groups]
        diffs[i] = np.mean([np.average(correct_a[p] - correct_b[p], weights=weights[p]) for p in picks])
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def rewardbench2_comparison(
    a: pd.DataFrame, b: pd.DataFrame, draws: int = 2000, seed: int = 0
) -> tuple[float, float, float, float]:
    """(score a, score b, 95 % interval of a - b) on a RewardBench 2 table: the official score Table 2 reports
    (best-of-4 per prompt, the Ties formula, the mean of the subsets), prompts resampled within each subset
    (a Ties prompt's ref and tied groups together), the same draw for both models."""
    prompts_a, prompts_b = rewardbench2_prompts(a), rewardbench2_prompts(b)
    if prompts_a[["subset", "prompt"]].values.tolist() != prompts_b[["subset", "prompt"]].values.tolist():
        raise ValueError("the two models were scored on different RewardBench 2 prompts")
    score_a = rewardbench2_subset_scores(prompts_a)["score"]
    score_b = rewardbench2_subset_scores(prompts_b)["score"]
    rng = np.random.default_rng(seed)
    subsets = prompts_a["subset"].to_numpy()
    groups = [np.flatnonzero(subsets == s) for s in pd.unique(subsets)]
    diffs = np.empty(draws)
    for i in range(draws):
        counts = sum(np.bincount(rng.choice(g, size=len(g)), minlength=len(subsets)) for g in groups)
        diffs[i] = rewardbench2_subset_scores(prompts_a, counts)["score"] - rewardbench2_subset_scores(prompts_b, counts)["score"]
    if np.isnan(diffs).all():  # Ties without a prompt that has both groups: the official score is NaN
        return score_a, score_b, float("nan"), float("nan")
    return score_a, score_b, float(np.nanpercentile(diffs, 2.5)), float(np.nanpercentile(diffs, 97.5))


def pair_comparison(a: pd.DataFrame, b: pd.DataFrame, draws: int = 2000, seed: int = 0) -> tuple[float, float, float, float]:
    """(score a, score b, 95 % interval of a - b) on a table scored pair by pair: the accuracy tables' overall
    (`category_mean_accuracy`, official v1 subsets at their official weights: RewardBench v1's score), pairs
    resampled within categories, the same draw for both models."""
    categories, weights = a["category"].to_numpy(), pair_weights(a)
    correct_a = pair_correct(a["score_chosen"], a["score_rejected"]).astype(float)
    correct_b = pair_correct(b["score_chosen"], b["score_rejected"]).astype(float)
    score_a = category_mean_accuracy(correct_a, categories, weights)
    score_b = category_mean_accuracy(correct_b, categories, weights)
    low, high = paired_bootstrap(correct_a, correct_b, categories, draws, seed, weights=weights)
    return score_a, score_b, low, high


# A benchmark's scoring rule (`sarm.schema.Benchmark.scoring`) -> the paired comparison on its score.
COMPARISONS = {"best_of_n": rewardbench2_comparison, "sections": pair_comparison, "pairs": pair_comparison}


def verdict(difference: float, low: float, high: float) -> str:
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "holds (within noise)" if difference > 0 else "tie" if difference == 0 else "reversed (within noise)"


def ordering_table(scores: dict[str, dict[str, pd.DataFrame]], specs: dict, draws: int = 2000) -> pd.DataFrame:
    """One row per (claim, model pair, table); `scores[model][table]` is a per-example score table, compared the
    way its benchmark is scored (`COMPARISONS`): a RewardBench 2 table on its official score
    (`rewardbench2_comparison`), any other on the accuracy tables' overall (`pair_comparison`)."""
    rows = []
    for claim, win, lose in comparisons(specs):
        for table in scores[win]:
            a, b = scores[win][table], scores[lose][table]
            if a["id"].tolist() != b["id"].tolist():
                raise ValueError(f"{win} and {lose} were scored on different pairs of {table}")
            compare = COMPARISONS[benchmark(benchmark_of(a)).scoring]
            score_a, score_b, low, high = compare(a, b, draws)
            rows.append(
                {
                    "claim": claim,
                    "table": table,
                    "winner_by_paper": win,
                    "loser_by_paper": lose,
                    "score_winner": 100 * score_a,
                    "score_loser": 100 * score_b,
                    "difference": 100 * (score_a - score_b),
                    "ci_low": 100 * low,
                    "ci_high": 100 * high,
                    "verdict": verdict(score_a - score_b, low, high),
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS).round(1)
