"""Score cached evaluation pairs with a reward model, and summarise them the RewardBench way."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sarm.activations import ActivationCache
from sarm.errors import SarmError
from sarm.reward_model import RewardModel, check_finite
from sarm.rewardbench import score_table


def score_cached(model: RewardModel, cache: ActivationCache, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-example scores (id, subset, category, score_chosen, score_rejected) from cached states, plus the
    pairs' optional grouping and benchmark columns (`rewardbench.PASS_THROUGH`) when they have them, and the
    model's per-sequence details (`score_cache`; e.g. a multi-objective model's `objective_<name>`, `gate_<name>`)
    as `<detail>_chosen` / `<detail>_rejected`."""
    cached_ids = cache.index.loc[cache.index["side"] == "chosen", "id"].tolist()
    if cached_ids != pairs["id"].tolist():
        raise SarmError(f"{cache.folder} was cached from other pairs than the table given; re-run its rule")
    rewards, details = model.score_cache(cache)
    rewards = rewards.numpy()
    check_finite(rewards, model, f"the cache {cache.folder}")
    table = score_table(pairs, rewards[0::2], rewards[1::2])
    for name, values in details.items():
        table[f"{name}_chosen"], table[f"{name}_rejected"] = values[0::2], values[1::2]
    return table


def score_text(model, pairs: pd.DataFrame, batch_size: int = 16) -> pd.DataFrame:
    """The same table from raw text, for a model whose backbone was fine-tuned (no cached states fit it):
    a RewardModel or a full-depth classifier (`sarm.reward_model.load`)."""
    prompts = pairs["prompt"].tolist()
    chosen = model.score(prompts, pairs["chosen"].tolist(), batch_size)
    rejected = model.score(prompts, pairs["rejected"].tolist(), batch_size)
    check_finite(np.concatenate([chosen, rejected]), model, "the pairs' text")
    return score_table(pairs, chosen, rejected)
