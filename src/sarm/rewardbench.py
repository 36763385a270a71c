"""Scoring of reward-model evaluations the RewardBench way: v1 (pairs), v2 (best-of-4 and Ties), local sets.

A per-example score table has the columns ``id, subset, category, score_chosen,
score_rejected``; a pair is right when the chosen response scores strictly higher.
RewardBench 2 tables also carry ``group, chosen_index, rejected_index`` (`GROUP_COLUMNS`):
the pairs of one prompt share its ``group`` and together score each of its completions at
least once. A table measured on an official benchmark carries a ``benchmark`` column.

The columns and the benchmarks' records live in `sarm.schema`; `summarize` scores a table by its benchmark's
scoring rule (`Benchmark.scoring`, a key of `SCORERS`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sarm.errors import SarmError
from sarm.schema import (
    BENCHMARK_COLUMN,
    BENCHMARKS,
    EXAMPLE_COUNTS,
    GROUP_COLUMNS,
    LOCAL,
    PAIR_COLUMNS,
    PASS_THROUGH,
    SCORE_COLUMNS,
    SECTIONS,
    V2_PROMPTS,
    Benchmark,
    benchmark,
)

V2_SUBSETS = list(V2_PROMPTS)
SUBSET_COLUMNS = ["category", "subset", "n", "accuracy"]


def _require(table: pd.DataFrame, columns: list[str], what: str) -> None:
    """Raise SarmError naming the first of ``columns`` missing from ``table``, or if it is empty."""
    for column in columns:
        if column not in table.columns:
            raise SarmError(f"{what} lacks the required column {column!r}")
    if table.empty:
        raise SarmError(f"{what} has no rows")


def pair_correct(score_chosen, score_rejected) -> np.ndarray:
    """Per pair, whether chosen scores strictly above rejected (ties and NaN are wrong)."""
    chosen = np.asarray(score_chosen, dtype=float)
    rejected = np.asarray(score_rejected, dtype=float)
    return chosen > rejected


def subset_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Pair count and accuracy per (category, subset), sorted by category then subset."""
    _require(scores, SCORE_COLUMNS, "score table")
    categories_per_subset = scores.groupby("subset")["category"].nunique()
    shared = categories_per_subset[categories_per_subset > 1]
    if not shared.empty:
        name = shared.index[0]
        found = sorted(scores.loc[scores["subset"] == name, "category"].unique())
        raise SarmError(f"subset {name!r} appears under several categories: {found}")
    table = scores[["category", "subset"]].assign(correct=pair_correct(scores["score_chosen"], scores["score_rejected"]))
    out = table.groupby(["category", "subset"], sort=True)["correct"].agg(n="size", accuracy="mean").reset_index()
    return out.astype({"n": int, "accuracy": float})[SUBSET_COLUMNS]


def category_scores(subsets: pd.DataFrame) -> pd.DataFrame:
    """Weighted accuracy per category plus an ``overall`` row, the unweighted mean of categories.

    A subset weighs ``EXAMPLE_COUNTS[subset]`` if it is an official RewardBench v1
    subset, else its observed ``n``. ``weighting`` says which applied: "rewardbench-v1",
    "by-size" or "mixed"; the overall row says "mean-of-categories".
    """
    _require(subsets, SUBSET_COLUMNS, "subset table")
    official = subsets["subset"].isin(EXAMPLE_COUNTS.keys())
    weight = subsets["subset"].map(EXAMPLE_COUNTS).where(official, subsets["n"]).astype(float)
    table = subsets.assign(official=official, weight=weight, weighted=weight * subsets["accuracy"])
    rows = []
    for category, group in table.groupby("category", sort=True):
        if group["official"].all():
            weighting = "rewardbench-v1"
        elif not group["official"].any():
            weighting = "by-size"
        else:
            weighting = "mixed"
        rows.append(
            {
                "category": category,
                "n": int(group["n"].sum()),
                "accuracy": float(group["weighted"].sum() / group["weight"].sum()),
                "weighting": weighting,
            }
        )
    rows.append(
        {
            "category": "overall",
            "n": int(subsets["n"].sum()),
            "accuracy": float(np.mean([row["accuracy"] for row in rows])),
            "weighting": "mean-of-categories",
        }
    )
    return pd.DataFrame(rows, columns=["category", "n", "accuracy", "weighting"])


def rewardbench_v1_sections(subset_accuracy: dict[str, float]) -> dict[str, float]:
    """Official RewardBench v1 section scores (Σ acc·count / Σ count over present subsets) and ``score``.

    ``score`` is the mean of the sections present; keys outside every section are ignored.
    """
    sections = {}
    for section, names in SECTIONS.items():
        present = [name for name in names if name in subset_accuracy]
        if present:
            total = sum(float(subset_accuracy[name]) * EXAMPLE_COUNTS[name] for name in present)
            sections[section] = total / sum(EXAMPLE_COUNTS[name] for name in present)
    if not sections:
        raise SarmError("no RewardBench v1 subset among the given accuracies")
    sections["score"] = float(np.mean(list(sections.values())))
    return sections


def score_table(pairs: pd.DataFrame, score_chosen, score_rejected) -> pd.DataFrame:
    """Score table of `pairs`: id, subset, category, the given scores, then any `PASS_THROUGH` column."""
    extra = [column for column in PASS_THROUGH if column in pairs.columns]
    table = pairs[["id", "subset", "category", *extra]].reset_index(drop=True)
    table.insert(3, "score_chosen", np.asarray(score_chosen, dtype=float))
    table.insert(4, "score_rejected", np.asarray(score_rejected, dtype=float))
    return table


def length_baseline(pairs: pd.DataFrame) -> pd.DataFrame:
    """Score table in which each response scores its length in characters."""
    _require(pairs, PAIR_COLUMNS, "pair table")
    return score_table(pairs, pairs["chosen"].str.len(), pairs["rejected"].str.len())


# ---------------------------------------------------------------------------------------------------------------
# RewardBench 2: best-of-4 and Ties
# ---------------------------------------------------------------------------------------------------------------


def completion_table(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per scored completion: subset, group, correct, index, score.

    A completion scored in several pairs (the chosen one of a best-of-4 prompt is in all three) keeps the score
    of its first pair, as the official code scores each completion once: an average of equal float64 scores
    can differ from them in the last bit (3 x 0.1 / 3 = 0.10000000000000002) and so break an exact tie that
    the official code counts.
    """
    _require(scores, [*SCORE_COLUMNS, *GROUP_COLUMNS], "score table")
    sides = []
    for side, correct in (("chosen", True), ("rejected", False)):
        sides.append(
            pd.DataFrame(
                {
                    "subset": scores["subset"].to_numpy(),
                    "group": scores["group"].astype(str).to_numpy(),
                    "correct": correct,
                    "index": scores[f"{side}_index"].astype(int).to_numpy(),
                    "score": scores[f"score_{side}"].astype(float).to_numpy(),
                }
            )
        )
    table = pd.concat(sides, ignore_index=True)
    subsets_per_group = table.groupby("group")["subset"].nunique()
    if (subsets_per_group > 1).any():
        raise SarmError(f"group {subsets_per_group[subsets_per_group > 1].index[0]!r} appears in several subsets")
    keys = ["subset", "group", "correct", "index"]
    return table.drop_duplicates(keys, keep="first").reset_index(drop=True)


def best_of_n(correct_scores, incorrect_scores) -> float:
    """One prompt's official best-of-n result: 1/k when the first correct completion ties k-way for the top
    score, 0 when anything scores above it (allenai/reward-bench rewardbench/utils.py
    `reroll_and_score_dataset`, commit a0096928eb1d: `1 / np.sum(scores == max_val) if scores[0] == max_val`).
    A NaN score makes the prompt 0."""
    scores = np.asarray([*correct_scores, *incorrect_scores], dtype=float)
    top = np.max(scores)
    return float(1 / np.sum(scores == top)) if scores[0] == top else 0.0


def _prompt_stats(correct: np.ndarray, incorrect: np.ndarray) -> tuple[bool, float | None, float]:
    """(accurate, different_correct_margin, correct_incorrect_margin) of one Ties prompt."""
    different_correct_margin = float(correct.max() - correct.min()) if len(correct) > 1 else None
    correct_incorrect_margin = float(correct.min() - incorrect.max())
    return correct_incorrect_margin > 0, different_correct_margin, correct_incorrect_margin


TIES_PARTS = ["ref_accurate", "tied_accurate", "preferred", "preferred_hard", "margin_score"]


def ties_prompts(completions: pd.DataFrame) -> pd.DataFrame:
    """One row per Ties prompt number (`prompt`) with its parts of the official Ties score (`ties_score`):
    `ref_accurate` / `tied_accurate` (1.0 or 0.0; NaN where the prompt lacks that group) and, where it has
    both groups, `preferred` (margin_tied > spread), `preferred_hard` (min(margin_ref, margin_tied) > spread)
    and `margin_score` (tanh(min(margin_ref, margin_tied) / spread - 1), NaN as 0); else NaN."""
    stats = {"ref": {}, "tied": {}}
    for group, rows in completions.groupby("group", sort=False):
        kind, _, number = str(group).partition(":")
        if kind not in stats or not number.strip().lstrip("-").isdigit():
            raise SarmError(f"Ties group {group!r}: expected an id 'ref:<n>' or 'tied:<n>'")
        correct = rows.loc[rows["correct"], "score"].to_numpy(dtype=float)
        incorrect = rows.loc[~rows["correct"], "score"].to_numpy(dtype=float)
        if len(correct) == 0 or len(incorrect) == 0:
            raise SarmError(f"Ties group {group!r} needs at least one correct and one incorrect completion")
        stats[kind][int(number)] = _prompt_stats(correct, incorrect)
    numbers = sorted(set(stats["ref"]) | set(stats["tied"]))
    table = pd.DataFrame({"prompt": numbers}, dtype=object).assign(**{part: math.nan for part in TIES_PARTS})
    for kind in ("ref", "tied"):
        table[f"{kind}_accurate"] = [float(stats[kind][p][0]) if p in stats[kind] else math.nan for p in numbers]
    shared = [p for p in numbers if p in stats["ref"] and p in stats["tied"]]
    for prompt in shared:
        if stats["tied"][prompt][1] is None:
            raise SarmError(f"Ties group 'tied:{prompt}' has a single correct completion (the official code fails)")
    if shared:
        spread = np.array([stats["tied"][p][1] for p in shared])
        margin_tied = np.array([stats["tied"][p][2] for p in shared])
        margin_ref = np.array([stats["ref"][p][2] for p in shared])
        with np.errstate(divide="ignore", invalid="ignore"):
            margin_scores = np.nan_to_num(np.tanh(np.minimum(margin_ref, margin_tied) / spread - 1), nan=0.0)
        at = [numbers.index(p) for p in shared]
        table.loc[at, "preferred"] = (margin_tied > spread).astype(float)
        table.loc[at, "preferred_hard"] = (np.minimum(margin_ref, margin_tied) > spread).astype(float)
        table.loc[at, "margin_score"] = margin_scores
    return table


def ties_from_prompts(prompts: pd.DataFrame, weights=None) -> dict:
    """The official Ties score and its parts from `ties_prompts`, each prompt counted `weights` times (default
    once; a bootstrap resample gives counts). A part is the (weighted) mean over the prompts that have it;
    with none, the accuracies are 0 and the shared parts NaN, as in the official code."""
    w = np.ones(len(prompts)) if weights is None else np.asarray(weights, dtype=float)

    def mean(part: str, empty: float) -> float:
        values = prompts[part].to_numpy(dtype=float)
        present = ~np.isnan(values) & (w > 0)
        return float(np.sum(w[present] * values[present]) / np.sum(w[present])) if present.any() else empty

    parts = {
        "ref_accuracy": mean("ref_accurate", 0.0),
        "tied_accuracy": mean("tied_accurate", 0.0),
        "correctness_preferred": mean("preferred", math.nan),
        "correctness_preferred_hard": mean("preferred_hard", math.nan),
        "correctness_margin_score": mean("margin_score", math.nan),
    }
    parts["score"] = (
        0.30 * parts["tied_accuracy"]
        + 0.30 * parts["ref_accuracy"]
        + 0.20 * parts["correctness_preferred"]
        + 0.20 * parts["correctness_preferred_hard"]
        + 0.01 * parts["correctness_margin_score"]
    )
    return parts


def ties_score(completions: pd.DataFrame) -> dict:
    """The official Ties score and its parts, from the completions of the Ties subset.

    Reproduces allenai/reward-bench rewardbench/utils.py `process_single_model` and `_compute_prompt_stats`
    (commit a0096928eb1d54edd3f6361374708cc68e738b79), called by scripts/run_v2.py for the subset "Ties".
    Groups are `ref:<n>` (one correct answer) or `tied:<n>` (several); per prompt, accurate means the worst
    correct completion outscores the best incorrect one. Over the prompts n that have both a ref and a tied
    group: correctness_preferred = mean(margin_tied > spread), correctness_preferred_hard =
    mean(min(margin_ref, margin_tied) > spread), margin score = mean(tanh(min(margin_ref, margin_tied) /
    spread - 1)) with NaN (0/0) as 0, where margin = worst correct - best incorrect and spread = best correct
    - worst correct of the tied group. score = 0.30 tied_accuracy + 0.30 ref_accuracy
    + 0.20 correctness_preferred + 0.20 correctness_preferred_hard + 0.01 correctness_margin_score.
    """
    prompts = ties_prompts(completions)
    parts = ties_from_prompts(prompts)
    shared = int(prompts["preferred"].notna().sum())
    ordered = ["ref_accuracy", "tied_accuracy"]
    return {**{k: parts[k] for k in ordered}, "shared_prompts": shared, **{k: v for k, v in parts.items() if k not in ordered}}


PROMPT_COLUMNS = ["subset", "prompt", "result", *TIES_PARTS]


def rewardbench2_prompts(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per RewardBench 2 prompt (`PROMPT_COLUMNS`): in a best-of-4 subset its `best_of_n` result
    (`prompt` = its group), in Ties its parts of the Ties score (`prompt` = the number its ref and tied groups
    share; `ties_prompts`). The official subset scores are (weighted) means over these rows:
    `rewardbench2_subset_scores`."""
    completions = completion_table(scores)
    unknown = sorted(set(completions["subset"]) - set(V2_SUBSETS))
    if unknown:
        raise SarmError(f"subset {unknown[0]!r} is not a RewardBench 2 subset ({', '.join(V2_SUBSETS)})")
    frames = []
    for subset in [s for s in V2_SUBSETS if s in set(completions["subset"])]:
        rows = completions[completions["subset"] == subset]
        if subset == "Ties":
            ties = ties_prompts(rows)
            frames.append(ties.assign(subset=subset, result=math.nan, prompt=ties["prompt"].astype(str)))
            continue
        per_prompt = []
        for group, members in rows.groupby("group", sort=False):
            ordered = members.sort_values("index")
            per_prompt.append(
                {
                    "subset": subset,
                    "prompt": group,
                    "result": best_of_n(ordered.loc[ordered["correct"], "score"], ordered.loc[~ordered["correct"], "score"]),
                }
            )
        frames.append(pd.DataFrame(per_prompt).assign(**{part: math.nan for part in TIES_PARTS}))
    return pd.concat(frames, ignore_index=True)[PROMPT_COLUMNS]


def rewardbench2_subset_scores(prompts: pd.DataFrame, weights=None) -> dict[str, float]:
    """{subset: official score} and ``score`` (their mean) from `rewardbench2_prompts`, each prompt counted
    `weights` times (default once): a best-of-4 subset's score is the mean of its prompts' results, Ties's is
    `ties_from_prompts`."""
    w = np.ones(len(prompts)) if weights is None else np.asarray(weights, dtype=float)
    subsets = prompts["subset"].to_numpy()
    result = {}
    for subset in [s for s in V2_SUBSETS if s in set(subsets)]:
        here = subsets == subset
        if subset == "Ties":
            result[subset] = ties_from_prompts(prompts[here], w[here])["score"]
        else:
            values = prompts["result"].to_numpy(dtype=float)[here]
            result[subset] = float(np.sum(w[here] * values) / np.sum(w[here]))
    result["score"] = float(np.mean(list(result.values())))
    return result


def rewardbench2_scores(scores: pd.DataFrame) -> dict:
    """Official RewardBench 2 scores: {subset: score}, ``score`` (the mean of the six subsets present),
    ``n_prompts`` per subset and the parts of the Ties score. Non-Ties subsets: the mean of `best_of_n`
    over their prompts (scripts/run_v2.py); Ties: `ties_score`."""
    completions = completion_table(scores)
    result = rewardbench2_subset_scores(rewardbench2_prompts(scores))
    n_prompts = {s: int(completions.loc[completions["subset"] == s, "group"].nunique()) for s in result if s != "score"}
    ties = ties_score(completions[completions["subset"] == "Ties"]) if "Ties" in n_prompts else None
    return {"scores": result, "n_prompts": n_prompts, "ties": ties}


# ---------------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------------


def benchmark_of(scores: pd.DataFrame) -> str:
    """The key of the benchmark a score table was measured on (`sarm.schema.BENCHMARKS`): its `benchmark`
    column, else "local"."""
    if BENCHMARK_COLUMN not in scores.columns:
        return LOCAL.key
    found = scores[BENCHMARK_COLUMN].dropna().unique().tolist()
    if len(found) == 1 and found[0] in BENCHMARKS and scores[BENCHMARK_COLUMN].notna().all():
        return found[0]
    if not found:
        return LOCAL.key
    raise SarmError(f"score table mixes benchmarks or holds an unknown one: {sorted(map(str, found))}")


def _json_number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _rewardbench2_summary(bench: Benchmark, scores: pd.DataFrame, subsets: pd.DataFrame, categories: pd.DataFrame) -> dict:
    """RewardBench 2's summary keys: the six subset scores (best-of-4, Ties) and ``score``, ``n_prompts``,
    ``complete`` and the parts of the Ties score."""
    v2 = rewardbench2_scores(scores)
    out = {
        "benchmark_scores": {key: _json_number(value) for key, value in v2["scores"].items()},
        "n_prompts": v2["n_prompts"],
        "complete": v2["n_prompts"] == dict(bench.sizes),
    }
    if v2["ties"] is not None:
        out["ties"] = {key: _json_number(value) for key, value in v2["ties"].items()}
    return out


def _sections_summary(bench: Benchmark, scores: pd.DataFrame, subsets: pd.DataFrame, categories: pd.DataFrame) -> dict:
    """RewardBench v1's summary keys: the four section scores and ``score``, and ``complete``."""
    unknown = sorted(set(subsets["subset"]) - set(EXAMPLE_COUNTS))
    if unknown:
        raise SarmError(f"subset {unknown[0]!r} is not a {bench.name} subset")
    accuracy = dict(zip(subsets["subset"], subsets["accuracy"]))
    return {
        "benchmark_scores": rewardbench_v1_sections(accuracy),
        "complete": dict(zip(subsets["subset"], subsets["n"])) == dict(bench.sizes),
    }


def _pairs_summary(bench: Benchmark, scores: pd.DataFrame, subsets: pd.DataFrame, categories: pd.DataFrame) -> dict:
    """A local set's summary keys: its category accuracies and ``overall``; ``complete`` null."""
    return {"benchmark_scores": dict(zip(categories["category"], categories["accuracy"])), "complete": None}


# A benchmark's scoring rule (`Benchmark.scoring`) -> the summary keys it adds (`summarize`).
SCORERS = {"best_of_n": _rewardbench2_summary, "sections": _sections_summary, "pairs": _pairs_summary}


def summarize(scores: pd.DataFrame, model: str) -> dict:
    """JSON-serialisable summary: pair count and accuracy, subset and category tables, and the benchmark's own
    scores.

    ``benchmark`` is "rewardbench-2", "rewardbench-v1" or "local" (`benchmark_of`); ``benchmark_scores`` holds
    RewardBench 2's six subset scores and ``score`` (their mean), RewardBench v1's four section scores and
    ``score`` (their mean), or a local set's category accuracies and ``overall``: its record's scoring rule
    (`sarm.schema.Benchmark.scoring`, a key of `SCORERS`). ``complete`` says whether an official benchmark was
    scored in full (every subset at its official size); null for local sets.
    """
    bench = benchmark(benchmark_of(scores))
    subsets = subset_table(scores)
    categories = category_scores(subsets)
    summary = {
        "model": model,
        "benchmark": bench.key,
        "n_pairs": int(len(scores)),
        "accuracy": float(pair_correct(scores["score_chosen"], scores["score_rejected"]).mean()),
        "subsets": subsets.to_dict(orient="records"),
        "categories": categories.to_dict(orient="records"),
    }
    summary.update(SCORERS[bench.scoring](bench, scores, subsets, categories))
    return summary
