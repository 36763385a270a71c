"""`mode: multi_objective`: one SARM head per objective and a gate over the prompt that mixes them, in the spirit
of ArmoRM (Wang et al., "Interpretable Preferences via Multi-Objective Reward Modeling and Mixture-of-Experts",
arXiv 2406.12845), on cached states of the frozen base model.

1. Objectives: config key `objectives` maps an objective's name to the training pairs' categories it learns from
   (null: one objective per category of the training pairs, e.g. helpful and harmless in the default config).
2. Stage 1: per objective, a zero-initialised linear BT head, no bias, on its categories' pairs
   (`sarm.reward.train_head`, the frozen head's loop), over the frozen head's features of the final token
   (`features: sae`: SAE latents; `hidden`: the standardised state); the epoch best on that objective's
   validation pairs is kept.
3. Stage 2: the heads fixed, a gate g(prompt) = softmax((V z(prompt) + b) / gate_temperature) over the same
   features of the prompt state (the last token before the response, cached with the final one) is trained with
   BT on all training pairs (`sarm.reward.fit_pairs`; V and b zero-initialised: a uniform mix at the start), the
   epoch best on all validation pairs kept. Reward r = sum_k g_k(prompt) r_k(response).

The model is a `sarm.gated_reward_model.GatedRewardModel` (format `sarm-multi-objective`), scored from the base
model's caches (evaluation keeps each objective's score and the gate's weights per example) and from text.

Where ArmoRM differs: its objectives are 19 absolute ratings (HelpSteer, UltraFeedback, BeaverTails, ...) fitted
by ridge regression on a frozen 8B backbone's last-token state, and its gate is an MLP on the prompt's state
trained with BT on preference pairs, with a verbosity correction (each objective decorrelated from length) and a
learned temperature-scaled output. Here the objectives are pairwise BT heads on preference pairs of a category
(no ratings exist in these data), over SAE latents; the gate is linear over the same features (so its weights
read as features too), its temperature fixed, and there is no length decorrelation.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from sarm.errors import SarmError
from sarm.variants.frozen import FrozenHead
from sarm.variants.spec import Cost, register

logger = logging.getLogger(__name__)

OBJECTIVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # becomes a column name of the score tables


@register("multi_objective")
@dataclass(frozen=True)
class MultiObjective(FrozenHead):
    objectives: dict | None = None  # objective name -> the training pairs' categories it learns from; None: one per category
    gate_temperature: float = 1.0  # the gate's softmax temperature

    paper_head = False
    linear_head = False

    @classmethod
    def check(cls, key: str, given: dict) -> None:
        super().check(key, given)
        objectives = given.get("objectives")
        if objectives is not None:
            if not isinstance(objectives, dict) or not objectives:
                raise SarmError(f"{key}.objectives: {objectives!r} must map objective names to lists of categories, or be null")
            for name, categories in objectives.items():
                if not isinstance(name, str) or not OBJECTIVE_NAME.match(name):
                    raise SarmError(f"{key}.objectives: {name!r} is not an objective name (letters, digits, _ and -)")
                if not isinstance(categories, list) or not categories or not all(isinstance(c, str) and c for c in categories):
                    raise SarmError(f"{key}.objectives.{name}: {categories!r} must be a non-empty list of category names")
        temperature = given.get("gate_temperature")
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
        ):
            raise SarmError(f"{key}.gate_temperature: {temperature!r} must be a number > 0")

    # --- cost: the frozen head's, K + 1 times over the features (K heads, then the gate reads the prompt's) ---
    def _objectives_planned(self, config: dict) -> int:
        return len(self.objectives or config["train"]["datasets"])  # null: about one category per training data set

    def training_cost(self, config: dict, shape, gpu: bool) -> Cost:
        frozen = super().training_cost(config, shape, gpu)
        k = self._objectives_planned(config)
        return Cost(frozen.host_mb * 2, 0, frozen.flops * (k + 2), 0)  # the prompt's features too; K heads, the gate

    def scoring_cost(self, config: dict, shape, table: str, gpu: bool) -> Cost:
        frozen = super().scoring_cost(config, shape, table, gpu)
        return Cost(frozen.host_mb * 2, 0, frozen.flops * 2, 0)

    # --- training ---
    def objectives_of(self, categories: list[str]) -> dict[str, list[str]]:
        """The objectives and their categories, checked against the training pairs' `categories`."""
        present = sorted(set(categories))
        if self.objectives is None:
            return {category: [category] for category in present}
        for name, wanted in self.objectives.items():
            missing = [c for c in wanted if c not in present]
            if missing:
                raise SarmError(
                    f"config key reward_models.{self.name}.objectives.{name}: no training pair has category "
                    f"{missing[0]!r} (the training pairs' categories: {', '.join(present)})"
                )
        return {name: list(wanted) for name, wanted in self.objectives.items()}

    def fit_cached(
        self, train, val, model_dir, model_spec: dict, settings: dict, sae=None, seed: int = 0, log=None, checkpoint_root=None
    ):
        """Fit the objectives' heads, then the gate, on `train` (an ActivationCache with each pair's `category`
        and prompt states); keep the epochs best on `val`: (a `GatedRewardModel`, the history of both stages, one
        row per stage and epoch, with columns `stage` and `objective`)."""
        import pandas as pd
        import torch

        from sarm import checkpoints
        from sarm.gated_reward_model import GatedRewardModel
        from sarm.length_debias import cached_differences, length_debias
        from sarm.reward import (
            cached_model_config,
            checkpoint_fingerprint,
            optimiser,
            record_selection,
            selected_epoch,
            train_head,
        )
        from sarm.reward_model import MULTI_OBJECTIVE_FORMAT, RewardModel

        if self.features == "sae" and sae is None:
            raise SarmError(f"reward model {self.name}: multi_objective with features: sae needs its SAE")
        train_categories, val_categories = _pair_categories(train), _pair_categories(val)
        objectives = self.objectives_of(train_categories)
        spec = self.as_dict()
        differences = cached_differences(train) if self.length_debias else None  # per training pair
        config = cached_model_config(spec, train, model_dir, model_spec, settings, seed)
        config["format"] = MULTI_OBJECTIVE_FORMAT
        config["read_at"] = "final token (response) and last token before the response (prompt)"
        width = sae.cfg.d_sae if self.features == "sae" else train.hidden_size
        shell = RewardModel(config, torch.zeros(width), sae)  # the frozen head's feature map
        features, prompts = {}, {}
        for name, cache in (("train", train), ("val", val)):
            final, prompt = cache.states("final", "prompt")  # one pass over the shards
            features[name], prompts[name] = shell.features(final, sparse=True), shell.features(prompt, sparse=True)
        if checkpoint_root is not None:
            checkpoint_root = checkpoints.open_root(checkpoint_root, checkpoint_fingerprint(config, train, val))

        def stage_root(stage: str):
            return None if checkpoint_root is None else checkpoint_root / stage

        heads, histories, record = [], [], {}
        for k, (name, categories) in enumerate(objectives.items()):
            train_rows = _rows_of(train_categories, categories)
            val_rows = _rows_of(val_categories, categories)
            if not len(val_rows):
                logger.warning(
                    "objective %s: no validation pair in its categories; its epoch is chosen on all validation pairs", name
                )
                val_rows = torch.arange(len(val_categories) * 2)
            lengths = None if differences is None else differences[train_rows[0::2] // 2]
            debias = length_debias(spec, lengths)
            weight, history = train_head(
                features["train"][train_rows],
                features["val"][val_rows],
                **optimiser(settings),
                seed=seed,
                log=log,
                checkpoint_root=stage_root(f"objective{k}"),
                debias=debias,
                differences=lengths,
            )
            best = history.loc[selected_epoch(history) - 1]
            record[name] = {
                "categories": categories,
                "n_train_pairs": len(train_rows) // 2,
                "n_val_pairs": len(val_rows) // 2,
                "selected_epoch": int(best["epoch"]),
                "val_accuracy": float(best["val_accuracy"]),
                **(debias.record() if debias is not None else {}),
            }
            heads.append(weight)
            histories.append(history.assign(stage="objective", objective=name))
        config["multi_objective"] = {"objectives": record, "gate_temperature": float(self.gate_temperature)}
        k = len(heads)
        tensors = {"heads": torch.stack(heads), "gate.weight": torch.zeros(k, width), "gate.bias": torch.zeros(k)}
        model = GatedRewardModel(config, tensors, sae)
        debias = length_debias(spec, differences)
        history = train_gate(model, features, prompts, settings, seed, log, stage_root("gate"), debias, differences)
        histories.append(history.assign(stage="gate", objective=None))
        record_selection(config, history, debias)  # the gate's (each head's: its objective's record)
        return model, pd.concat(histories, ignore_index=True)


def _pair_categories(cache) -> list[str]:
    """Each pair's category, from the cache index (its chosen rows); a cache without them names its folder."""
    index = cache.index
    if "category" not in index.columns:
        raise SarmError(f"{cache.folder}: cached before its index kept the pairs' categories; re-run the rule that cached it")
    return index.loc[index["side"] == "chosen", "category"].astype(str).tolist()


def _rows_of(categories: list[str], wanted: list[str]):
    """The cache rows (2i, 2i+1 interleaved) of the pairs whose category is in `wanted`."""
    import torch

    pairs = torch.tensor([i for i, category in enumerate(categories) if category in wanted], dtype=torch.long)
    return torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()


@dataclass(frozen=True)
class GateRows:
    """Paired rows for the gate's training: the objectives' scores of each response [n, K] (fixed) and its prompt's
    features; `fit_pairs` slices and indexes them as it does a feature matrix."""

    scores: object
    prompt: object

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, rows) -> GateRows:
        return GateRows(self.scores[rows], self.prompt[rows])


def train_gate(
    model,
    features: dict,
    prompts: dict,
    settings: dict,
    seed: int = 0,
    log=None,
    checkpoint_root=None,
    debias=None,
    differences=None,
):
    """Train `model`'s gate (V, b) with BT on all paired rows, its heads fixed, in `sarm.reward.fit_pairs` (the epoch
    best on validation kept; `debias`, `differences`: its length-debiased loss); leave the model at that epoch.
    Returns one history row per epoch."""
    import torch

    from sarm.reward import fit_pairs, optimiser

    rows = {name: GateRows(model.objective_scores(features[name]), prompts[name]) for name in ("train", "val")}
    weight = model.gate_weight.clone().requires_grad_(True)
    bias = model.gate_bias.clone().requires_grad_(True)

    def score(batch: GateRows):
        return (model.gate(batch.prompt, weight, bias) * batch.scores).sum(-1)

    (best_weight, best_bias), history = fit_pairs(
        [weight, bias],
        score,
        rows["train"],
        rows["val"],
        **optimiser(settings),
        seed=seed,
        log=log,
        checkpoint_root=checkpoint_root,
        what="multi-objective gate training",
        debias=debias,
        differences=differences,
    )
    with torch.no_grad():
        model.gate_weight, model.gate_bias = best_weight.detach().clone(), best_bias.detach().clone()
    return history
