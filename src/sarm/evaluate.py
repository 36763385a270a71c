"""Score cached evaluation pairs with a reward model, and summarise them the RewardBench way."""

from __future__ import annotations

import pandas as pd

from sarm.activations import ActivationCache
from sarm.errors import SarmError
from sarm.reward import RewardModel
from sarm.rewardbench import score_table


def score_cached(model: RewardModel, cache: ActivationCache, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-example scores (id, subset, category, score_chosen, score_rejected) from cached states, plus the
    pairs' optional grouping and benchmark columns (`rewardbench.PASS_THROUGH`) when they have them."""
    cached_ids = cache.index.loc[cache.index["side"] == "chosen", "id"].tolist()
    if cached_ids != pairs["id"].tolist():
        raise SarmError(f"{cache.folder} was cached from other pairs than the table given; re-run its rule")
    rewards = model.score_hidden(cache.final()).numpy()
    return score_table(pairs, rewards[0::2], rewards[1::2])
