"""Score cached evaluation pairs with a reward model, and summarise them the RewardBench way."""

from __future__ import annotations

import pandas as pd

from sarm.activations import ActivationCache
from sarm.errors import SarmError
from sarm.reward import RewardModel


def score_cached(model: RewardModel, cache: ActivationCache, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-example scores (id, subset, category, score_chosen, score_rejected) from cached states."""
    cached_ids = cache.index.loc[cache.index["side"] == "chosen", "id"].tolist()
    if cached_ids != pairs["id"].tolist():
        raise SarmError(f"{cache.folder} was cached from other pairs than the table given; re-run its rule")
    rewards = model.score_hidden(cache.final()).numpy()
    return pairs[["id", "subset", "category"]].assign(score_chosen=rewards[0::2], score_rejected=rewards[1::2])
