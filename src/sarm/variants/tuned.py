"""Kinds trained end to end on token ids with transformers' Trainer (`sarm.finetune`):

- `mode: finetune` (the paper): layers 1..L and the head train, the SAE stays frozen;
- `mode: joint` (the public recipe): the SAE trains too, loss BT + recon_weight x normalised reconstruction MSE.

`features: hidden` in `finetune` mode is the dense baseline on a fine-tuned backbone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from sarm.errors import SarmError
from sarm.variants.spec import Cost, RewardModelSpec, register


class EndToEnd(RewardModelSpec):
    """What every end-to-end kind shares: its cost (a Trainer run of `finetune.epochs` over the training pairs,
    then scoring the evaluation tables from their text through its own weights)."""

    trains_on_cache = False
    own_backbone = True

    def _parameters(self, config: dict, shape) -> tuple[float, float]:
        """(parameters loaded, of which the SAE's)."""
        from sarm.cluster import sae_shape

        width, _ = sae_shape(config, shape.hidden_size)
        sae_params = 2 * shape.hidden_size * width if self.features == "sae" else 0
        return shape.loaded_b * 1e9 + sae_params, sae_params

    def _trained(self, n: float, sae_params: float) -> float:
        return n

    def _layers(self, config: dict, shape) -> int:
        return min(config["model"]["layer"], shape.num_hidden_layers)

    def training_cost(self, config: dict, shape, gpu: bool) -> Cost:
        from sarm.cluster import AVG_TOKENS_CAP, BASE_MB, UNKNOWN_PAIRS, mb, table_pairs, training_memory_mb

        model, finetune = config["model"], config["finetune"]
        n, sae_params = self._parameters(config, shape)
        pairs = min(table_pairs(config, "train"), finetune["max_pairs"] or UNKNOWN_PAIRS)
        tokens = 2 * pairs * min(model["max_length"], AVG_TOKENS_CAP) * finetune["epochs"]
        flops = 8 * n * tokens  # forward + backward (6) + the forward gradient checkpointing repeats (2)
        # the processes the job's script launches (sarm.finetune.processes): one per GPU, or cpu_processes
        procs = finetune["gpus"] if gpu else finetune.get("cpu_processes", 1)
        step_mb = training_memory_mb(  # what sarm.finetune checks before training, per process
            int(n),
            int(self._trained(n, sae_params)),
            2 * finetune["per_device_batch_size"],
            model["max_length"],
            shape.hidden_size,
            self._layers(config, shape),
            shape.heads,
            finetune["gradient_checkpointing"],
            gpu,
            procs if finetune.get("zero3") else 1,
        )
        # every process loads the fp32 model on the host before moving it to its GPU (or trains there)
        host = procs * (BASE_MB + mb(n * 4 * 1.25) if gpu else step_mb * 1.1)
        return Cost(host, step_mb if gpu else 0, flops / (procs if gpu else 1), finetune["gpus"])  # CPU processes share threads

    def scoring_cost(self, config: dict, shape, table: str, gpu: bool) -> Cost:
        from sarm.cluster import AVG_TOKENS_CAP, BASE_MB, mb, table_pairs

        model, h = config["model"], shape.hidden_size
        n, _ = self._parameters(config, shape)
        sequences = 2 * table_pairs(config, table)
        flops = 2 * n * sequences * min(model["max_length"], AVG_TOKENS_CAP)
        gpu_mem = mb(n * 2 + model["batch_size"] * model["max_length"] * h * 4 * 24) if gpu else 0
        return Cost(BASE_MB + mb(n * 4 * 1.25), gpu_mem, flops, 1)

    def build_trainable(self, model_dir, model_spec: dict, sae, tokenizer):
        import torch

        from sarm import models
        from sarm.finetune import SarmForReward
        from sarm.reward_model import set_topk

        backbone = models.load_truncated(
            model_dir, model_spec["layer"], torch.float32, "cpu", model_spec.get("trust_remote_code", False)
        )
        backbone.train()
        if self.features == "hidden":
            return SarmForReward(backbone, backbone.config.hidden_size)
        if sae is None:
            raise SarmError(f"reward model mode {self.kind} with features sae needs an SAE")
        sae = copy.deepcopy(sae).float()  # the caller's SAE stays as it was
        set_topk(sae, self.topk)
        return SarmForReward(backbone, sae.cfg.d_sae, sae, **self._sae_training())

    def _sae_training(self) -> dict:
        return {"train_sae": False, "recon_weight": 0.0}


@register("finetune")
class FineTuned(EndToEnd):
    feature_head = True
    paper_head = True

    def _trained(self, n: float, sae_params: float) -> float:
        return n - sae_params  # the SAE stays frozen


@register("joint")
@dataclass(frozen=True)
class Joint(EndToEnd):
    recon_weight: float = 1.0  # lambda of the reconstruction loss
    feature_head = True

    @classmethod
    def check(cls, key: str, given: dict) -> None:
        super().check(key, given)
        if given.get("features", "sae") != "sae":
            raise SarmError(f"{key}.mode: joint trains an SAE, so it needs features: sae")
        weight = given.get("recon_weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise SarmError(f"{key}.recon_weight: {weight!r} must be a number >= 0")

    def _sae_training(self) -> dict:
        return {"train_sae": True, "recon_weight": self.recon_weight}
