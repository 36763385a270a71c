"""How much a reward tracks response length: the correlations each evaluation summary keeps (`length_correlation`)
and the table of them beside accuracy and best-of-N's mean pick length (`length_bias_table`). Lengths here are in
characters (what a reader sees; training's length term counts tokens, `sarm.length_debias`)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sarm.errors import SarmError
from sarm.schema import GROUP_COLUMNS

BON_SELECTOR = {"length": "longest"}  # the length baseline's best-of-N pick is the longest candidate


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def responses(scores: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per scored response: reward and length in characters. A RewardBench 2 completion that is in several
    pairs (its `group` and index) counts once."""
    if scores["id"].astype(str).tolist() != pairs["id"].astype(str).tolist():
        raise SarmError("length correlation: the score table and the pair table hold other pairs (ids differ)")
    sides = []
    for side in ("chosen", "rejected"):
        table = pd.DataFrame({"reward": scores[f"score_{side}"].astype(float), "length": pairs[side].str.len()})
        if set(GROUP_COLUMNS) <= set(scores.columns):
            table["key"] = list(zip(scores["group"].astype(str), scores[f"{side}_index"].astype(int), strict=True))
        sides.append(table)
    table = pd.concat(sides, ignore_index=True)
    if "key" in table.columns:
        table = table.drop_duplicates("key").drop(columns="key")
    return table.reset_index(drop=True)


def length_correlation(scores: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """Pearson and Spearman correlation between reward and response length (characters) over the scored responses,
    and Pearson between the pairs' reward margins r_c - r_r and length differences len_c - len_r (null where
    either does not vary)."""
    table = responses(scores, pairs)
    margin = scores["score_chosen"].to_numpy(float) - scores["score_rejected"].to_numpy(float)
    difference = (pairs["chosen"].str.len() - pairs["rejected"].str.len()).to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        pair_pearson = pd.Series(margin).corr(pd.Series(difference))
    return {
        "unit": "characters",
        "responses": int(len(table)),
        "pearson": _number(table["reward"].corr(table["length"])),
        "spearman": _number(table["reward"].corr(table["length"], method="spearman")),
        "pairs": int(len(margin)),
        "pair_pearson": _number(pair_pearson),
    }


def overall(summary: dict) -> float:
    """The score an accuracy table's `overall` row shows: the mean of the categories (the pair accuracy for a
    summary without categories)."""
    categories = {row["category"]: row["accuracy"] for row in summary.get("categories", [])}
    return categories.get("overall", summary["accuracy"])


def length_bias_table(summaries: dict[tuple[str, str], dict], bon: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (reward model, eval table): the accuracy tables' overall score (%), the summary's length correlations and,
    where best-of-N ran
    (`bon`: the rows of `sarm.align.win_rates`), the model's best-of-N win rate and its picks' mean length."""
    picks = {} if bon is None else bon.set_index("selector")
    rows = []
    for (model, table), summary in summaries.items():
        if "length_correlation" not in summary:
            raise SarmError(f"the {table} summary of {model} has no length_correlation (older); re-run its evaluation")
        corr = summary["length_correlation"]
        row = {
            "model": model,
            "table": table,
            "accuracy": round(100 * overall(summary), 1),
            "pearson": corr["pearson"],
            "spearman": corr["spearman"],
            "pair_pearson": corr["pair_pearson"],
        }
        if bon is not None:
            selector = BON_SELECTOR.get(model, model)
            found = selector in picks.index
            row["bon_win_rate"] = picks.loc[selector, "win_rate"] if found else None
            row["bon_mean_length"] = picks.loc[selector, "mean_length"] if found else None
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.round({"pearson": 3, "spearman": 3, "pair_pearson": 3, "bon_win_rate": 1, "bon_mean_length": 0})


def bon_note(bon: pd.DataFrame | None) -> str:
    """The best-of-N reference lengths: the judge's preferred candidate (the oracle) and a random one."""
    if bon is None:
        return "No best-of-N run: its columns are left out."
    lengths = bon.set_index("selector")["mean_length"]
    return (
        f"Best-of-N mean pick length (characters): the judge's preferred candidate {lengths['oracle']:.0f}, "
        f"a random candidate {lengths['random']:.0f}; the length baseline's pick is the longest candidate."
    )
