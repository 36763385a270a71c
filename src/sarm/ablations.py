"""Do the paper's orderings hold here? Each claim compares two reward models that differ in one respect, on the
same pairs, with a paired, category-stratified bootstrap interval on the score difference. The score is the one
the paper's tables report: on RewardBench 2 the official score (best-of-4 per prompt, the Ties formula, the mean
of the six subsets; prompts resampled within subsets), elsewhere the accuracy tables' overall.

The models of a comparison are found by their config spec (features, mode, sae, topk), not by their names, so
any config that trains the two variants gets the comparison. `variant_table` sets every other trained model (the
seed papers' variants among them) beside the paper's SARM head, with intervals but no claimed ordering.
"""

from __future__ import annotations

import pandas as pd

from sarm.intervals import DRAWS, bootstrap, interval
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
                if spec_a.length_debias != spec_b.length_debias:  # trained with the same loss
                    continue
                if not about_mode and spec_a.kind != spec_b.kind:
                    continue
                if about_mode and spec_a.feature_head and spec_b.feature_head and not _same_head(spec_a, spec_b):
                    continue
                out.append((claim, a, b))
    return out


def _same_head(a: RewardModelSpec, b: RewardModelSpec) -> bool:
    return (a.features, a.sae, a.topk) == (b.features, b.sae, b.topk)


def verdict(difference: float, low: float, high: float) -> str:
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "holds (within noise)" if difference > 0 else "tie" if difference == 0 else "reversed (within noise)"


def ordering_table(scores: dict[str, dict[str, pd.DataFrame]], specs: dict, draws: int = DRAWS) -> pd.DataFrame:
    """One row per (claim, model pair, table); `scores[model][table]` is a per-example score table, compared on
    the score its benchmark's accuracy table reports (`sarm.intervals.bootstrap`)."""
    rows = []
    for claim, win, lose in comparisons(specs):
        for table in scores[win]:
            (score_a, score_b), values = _bootstrap(scores, win, lose, table, draws)
            low, high = interval(values[0] - values[1])
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


def _bootstrap(scores: dict, a: str, b: str, table: str, draws: int):
    """`sarm.intervals.bootstrap` of models a and b on `table`, an error naming them."""
    try:
        return bootstrap([scores[a][table], scores[b][table]], draws)
    except ValueError as err:
        raise ValueError(f"{a} and {b} on {table}: {err}") from None


# The reference every other variant is compared with: the paper's SARM head (frozen backbone, linear BT head on
# the TopK latents of the sequence-level SAE, trained without a length term).
REFERENCE = {"mode": "frozen", "features": "sae", "sae": "sequence", "topk": True, "length_debias": None}
VARIANT_COLUMNS = [
    "variant",
    "table",
    "reference",
    "score_variant",
    "ci_low_variant",
    "ci_high_variant",
    "score_reference",
    "difference",
    "ci_low",
    "ci_high",
    "verdict",
]


def reference_model(specs: dict[str, RewardModelSpec]) -> str | None:
    """The first trained model that is the paper's SARM head (`REFERENCE`), or None."""
    return next((name for name, spec in specs.items() if spec.matches(REFERENCE)), None)


def variant_table(scores: dict[str, dict[str, pd.DataFrame]], specs: dict, draws: int = DRAWS) -> pd.DataFrame:
    """Every trained model beside the paper's SARM head, table by table: its score with a 95 % bootstrap interval
    and its difference to the SARM head with a paired 95 % interval (the same resamples for both). No orderings
    are claimed: a positive difference means the variant scores higher here."""
    reference = reference_model(specs)
    rows = []
    for variant in specs:
        if reference is None or variant == reference:
            continue
        for table in scores[variant]:
            (score_v, score_r), values = _bootstrap(scores, variant, reference, table, draws)  # one set of resamples
            (low_v, high_v), (low, high) = interval(values[0]), interval(values[0] - values[1])
            rows.append(
                {
                    "variant": variant,
                    "table": table,
                    "reference": reference,
                    "score_variant": 100 * score_v,
                    "ci_low_variant": 100 * low_v,
                    "ci_high_variant": 100 * high_v,
                    "score_reference": 100 * score_r,
                    "difference": 100 * (score_v - score_r),
                    "ci_low": 100 * low,
                    "ci_high": 100 * high,
                    "verdict": {"holds": "higher", "reversed": "lower"}.get(
                        verdict(score_v - score_r, low, high), "within noise"
                    ),
                }
            )
    return pd.DataFrame(rows, columns=VARIANT_COLUMNS).round(1)
