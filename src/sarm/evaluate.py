"""Score cached evaluation pairs with a reward model, and summarise them the RewardBench way."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sarm.activations import ActivationCache
from sarm.errors import SarmError
from sarm.models import resolve_device, resolve_dtype
from sarm.provenance import describe, machine
from sarm.reward import RewardModel, check_finite
from sarm.rewardbench import score_table


def score_cached(model: RewardModel, cache: ActivationCache, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-example scores (id, subset, category, score_chosen, score_rejected) from cached states, plus the
    pairs' optional grouping and benchmark columns (`rewardbench.PASS_THROUGH`) when they have them."""
    cached_ids = cache.index.loc[cache.index["side"] == "chosen", "id"].tolist()
    if cached_ids != pairs["id"].tolist():
        raise SarmError(f"{cache.folder} was cached from other pairs than the table given; re-run its rule")
    rewards = model.score_hidden(cache.final()).numpy()
    check_finite(rewards, model, f"the cache {cache.folder}")
    return score_table(pairs, rewards[0::2], rewards[1::2])


def score_text(model, pairs: pd.DataFrame, batch_size: int = 16) -> pd.DataFrame:
    """The same table from raw text, for a model whose backbone was fine-tuned (no cached states fit it):
    a RewardModel or a full-depth classifier (`finetune.load_reward_model`)."""
    prompts = pairs["prompt"].tolist()
    chosen = model.score(prompts, pairs["chosen"].tolist(), batch_size)
    rejected = model.score(prompts, pairs["rejected"].tolist(), batch_size)
    check_finite(np.concatenate([chosen, rejected]), model, "the pairs' text")
    return score_table(pairs, chosen, rejected)


def computed_with(model, cache: ActivationCache | None = None, device: str = "cpu") -> dict:
    """The dtype and the processor the hidden states were computed with: those the cache recorded when it was
    written (a frozen backbone), or this process's when a tuned model scores from text."""
    if cache is not None:
        return {"dtype": cache.meta.get("dtype"), "machine": cache.meta.get("machine")}
    base = model.config["base_model"]
    dtype = resolve_dtype(base.get("dtype", "float32"), resolve_device(device))
    return {"dtype": str(dtype).removeprefix("torch."), "machine": machine()}


def computed_with_note(summaries) -> str:
    """One note for a table built from `summaries`: the dtypes and processors their hidden states came from."""
    lines = [describe(s["computed_with"]["dtype"], s["computed_with"]["machine"]) for s in summaries if s.get("computed_with")]
    lines = list(dict.fromkeys(line for line in lines if line))
    return ("Computed with: " + "; ".join(lines) + ".") if lines else ""
