"""Preference shift (the paper's Interpretability section): rank features by how much more often they fire on
the chosen than on the rejected responses of a target preference set, scale the head weights of the top
ones, save the edited head as a new reward model, and re-evaluate it on every category from cached
activations. Since r = sum_i w_i z_i, a response that fires none of the edited features keeps its reward
exactly."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sarm.errors import SarmError
from sarm.explain import check_features
from sarm.reward_model import RewardModel
from sarm.rewardbench import summarize

log = logging.getLogger(__name__)


def target_mask(pairs: pd.DataFrame, categories=(), subsets=(), table: str = "") -> np.ndarray:
    """Pairs whose category is in `categories` or whose subset is in `subsets`; an empty set is an error."""
    categories, subsets = list(categories or []), list(subsets or [])
    if not categories and not subsets:
        raise SarmError("config key shift: name the target set in shift.categories or shift.subsets")
    mask = (pairs["category"].isin(categories) | pairs["subset"].isin(subsets)).to_numpy()
    if not mask.any():
        key = "shift.categories" if categories else "shift.subsets"
        raise SarmError(
            f"config key {key}: the target set is empty: no pair of table {table!r} is in categories {categories} or "
            f"subsets {subsets} (categories there: {sorted(pairs['category'].unique())})"
        )
    return mask


def rank_features(features: torch.Tensor, mask: np.ndarray, weight: torch.Tensor) -> pd.DataFrame:
    """Every feature by the paper's score: firing rate on the target set's chosen responses minus that on its
    rejected ones (rows 2i / 2i+1 of `features` are pair i's chosen / rejected)."""
    fires = features > 0
    m = torch.from_numpy(np.array(mask, dtype=bool))
    chosen, rejected = fires[0::2][m].float().mean(0), fires[1::2][m].float().mean(0)
    table = pd.DataFrame(
        {
            "feature": np.arange(len(weight)),
            "weight": weight.numpy(),
            "fire_chosen_target": chosen.numpy(),
            "fire_rejected_target": rejected.numpy(),
        }
    )
    table["score"] = table["fire_chosen_target"] - table["fire_rejected_target"]
    return table.sort_values(["score", "fire_chosen_target"], ascending=False, kind="stable").reset_index(drop=True)


def edit_head(model: RewardModel, features: list[int], factor: float, note: dict | None = None) -> RewardModel:
    """A copy of `model` whose head weights of `features` are multiplied by `factor`."""
    features = check_features(features, len(model.weight), "config key shift.features")
    weight = model.weight.clone()
    weight[features] *= factor
    config = copy.deepcopy(model.config)
    config["edit"] = {"kind": "preference shift", "features": features, "factor": factor, **(note or {})}
    edited = RewardModel(config, weight, model.sae)
    edited.device = model.device
    if hasattr(model, "folder"):  # a tuned model's backbone (a path inside its folder) stays reachable when saved
        edited.folder = model.folder
    return edited


def shift_report(
    model: RewardModel, edited: RewardModel, tables: dict[str, tuple], target: tuple[str, np.ndarray]
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Re-evaluate `edited` against `model` on every table ({name: (cache, pairs)}).

    Returns (per table and category: pairs, firing rates of the edited features on chosen / rejected, mean
    reward change on responses that fire them and on those that do not, accuracy before / after; the target
    set first) and the per-response frame behind it (rewards before / after, whether it fires)."""
    edited_ids = torch.tensor(edited.config["edit"]["features"], dtype=torch.long)
    rows, responses = [], []
    for name in [target[0], *(t for t in tables if t != target[0])]:  # the target's table first
        cache, pairs = tables[name]
        z = model.features(cache.final())
        before, after = (z @ model.weight).numpy(), (z @ edited.weight).numpy()
        fires = (z[:, edited_ids] > 0).any(1).numpy()
        frame = pd.DataFrame(
            {
                "table": name,
                "pair": np.repeat(np.arange(len(pairs)), 2),
                "side": ["chosen", "rejected"] * len(pairs),
                "category": np.repeat(pairs["category"].to_numpy(), 2),
                "subset": np.repeat(pairs["subset"].to_numpy(), 2),
                "fires": fires,
                "before": before,
                "after": after,
                "delta": after - before,
                "target": np.repeat(target[1], 2) if name == target[0] else False,
            }
        )
        responses.append(frame)
        scores = {}
        for which, r in (("before", before), ("after", after)):
            scores[which] = summarize(
                pairs[["id", "subset", "category"]].assign(score_chosen=r[0::2], score_rejected=r[1::2]), which
            )
        acc = {w: {c["category"]: c["accuracy"] for c in s["categories"]} for w, s in scores.items()}
        groups = [("target set", frame["target"])] if name == target[0] else []
        groups += [(c, frame["category"] == c) for c in sorted(pairs["category"].unique())]
        groups.append(("overall", pd.Series(True, index=frame.index)))
        for label, sel in groups:
            part = frame[sel.to_numpy()]
            if label == "target set":
                ok_before = part.groupby("pair")["before"].agg(lambda s: s.iloc[0] > s.iloc[1]).mean()
                ok_after = part.groupby("pair")["after"].agg(lambda s: s.iloc[0] > s.iloc[1]).mean()
            else:
                ok_before, ok_after = acc["before"][label], acc["after"][label]
            rows.append(
                {
                    "table": name,
                    "set": label,
                    "pairs": len(part) // 2,
                    "fire_chosen_%": 100 * part.loc[part.side == "chosen", "fires"].mean(),
                    "fire_rejected_%": 100 * part.loc[part.side == "rejected", "fires"].mean(),
                    "mean_shift_firing": part.loc[part.fires, "delta"].mean() if part.fires.any() else 0.0,
                    "mean_shift_not_firing": part.loc[~part.fires, "delta"].mean() if (~part.fires).any() else 0.0,
                    "accuracy_before_%": 100 * ok_before,
                    "accuracy_after_%": 100 * ok_after,
                }
            )
    return pd.DataFrame(rows), pd.concat(responses, ignore_index=True)


def feature_table(
    ranking: pd.DataFrame, edited: RewardModel, responses: pd.DataFrame, tables: dict, target_table: str, target: np.ndarray
) -> pd.DataFrame:
    """The edited features: weight before / after, the paper's score and their firing rates on the target
    set's chosen and rejected responses and on every other response of every table."""
    ids = edited.config["edit"]["features"]
    rest_fires = []
    for name, (cache, pairs) in tables.items():
        z = edited.features(cache.final())[:, ids] > 0
        keep = ~np.repeat(target, 2) if name == target_table else np.ones(len(z), bool)
        rest_fires.append(z[torch.from_numpy(np.array(keep, dtype=bool))])
    rest = torch.cat(rest_fires).float().mean(0).numpy()
    out = ranking.set_index("feature").loc[ids].reset_index()
    out = out.assign(weight_after=edited.weight[ids].numpy(), fire_rest=rest)
    out[["fire_chosen_target", "fire_rejected_target", "score", "fire_rest"]] *= 100
    out = out.rename(
        columns={
            "weight": "weight_before",
            "fire_chosen_target": "fire_chosen_target_%",
            "fire_rejected_target": "fire_rejected_target_%",
            "score": "score_pp",
            "fire_rest": "fire_rest_%",
        }
    )
    return out[
        ["feature", "weight_before", "weight_after", "score_pp", "fire_chosen_target_%", "fire_rejected_target_%", "fire_rest_%"]
    ]


def shift_figure(responses: pd.DataFrame, path: str | Path, title: str) -> None:
    """The paper-style histogram: the target set's chosen and rejected rewards before and after the edit, and
    the reward change of responses that fire the edited features vs those that do not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    target = responses[responses["target"]]
    bins = np.histogram_bin_edges(np.r_[target["before"], target["after"]], bins=30)
    for side, colour in (("chosen", "#4575b4"), ("rejected", "#f4a93b")):
        part = target[target.side == side]
        axes[0].hist(part["before"], bins, histtype="step", lw=1.4, ls="--", color=colour, label=f"{side}, before")
        axes[0].hist(part["after"], bins, histtype="stepfilled", alpha=0.35, color=colour, label=f"{side}, after")
    axes[0].set_xlabel("reward")
    axes[0].set_ylabel("responses")
    axes[0].set_title("target set: rewards before / after")
    axes[0].legend(fontsize=8, frameon=False)
    firing, other = responses[responses.fires], responses[~responses.fires]
    bins = np.histogram_bin_edges(np.r_[responses["delta"], 0.0], bins=40)
    axes[1].hist(
        [firing["delta"], other["delta"]],
        bins,
        stacked=True,
        color=["#d73027", "#999999"],
        label=[f"fire an edited feature ({len(firing)})", f"fire none ({len(other)}): change exactly 0"],
    )
    axes[1].set_yscale("log")
    axes[1].set_xlabel("reward change after - before")
    axes[1].set_title("all evaluation responses")
    axes[1].legend(fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def preference_shift(model: RewardModel, tables: dict[str, tuple], settings: dict, target_table: str, out_model: str | Path):
    """The whole stage: rank on the target set, edit, save the edited model, re-evaluate. Returns
    (report table, feature table, per-response frame)."""
    if model.config["features"] != "sae":
        raise SarmError("the preference shift edits a SARM head (features: sae), not the dense baseline")
    if target_table not in tables:
        raise SarmError(f"config key shift.table: {target_table!r} is not an evaluation table ({sorted(tables)})")
    cache, pairs = tables[target_table]
    mask = target_mask(pairs, settings.get("categories"), settings.get("subsets"), target_table)
    z = model.features(cache.final())
    ranking = rank_features(z, mask, model.weight)
    # Scaling w_i by factor > 1 raises the reward of what fires feature i only when w_i > 0: among the
    # features that fire more on the target's chosen responses, edit those the head already rewards.
    chosen = list(settings.get("features") or ranking.loc[ranking["weight"] > 0, "feature"].head(settings["n_features"]).tolist())
    if not chosen:
        raise SarmError("config key shift.n_features: no feature with a positive head weight fires on the target set")
    note = {
        "target_table": target_table,
        "categories": list(settings.get("categories") or []),
        "subsets": list(settings.get("subsets") or []),
    }
    edited = edit_head(model, chosen, settings["factor"], note)
    edited.save_pretrained(out_model)
    log.info("edited features %s (factor %s) saved to %s", chosen, settings["factor"], out_model)
    report, responses = shift_report(model, edited, tables, (target_table, mask))
    features = feature_table(ranking, edited, responses, tables, target_table, mask)
    return report, features, responses
