"""Length-debiased training of any reward model (config keys `reward_models.<name>.length_debias` and
`length_weight`): an objective around the kind's pairwise loss that keeps the reward from tracking response length.

- `poe`, product of experts (Shen et al. 2023, "Loose lips sink ships: mitigating length bias in RLHF"): the loss
  is taken of the margin (r_c - r_r) + beta * (l_c - l_r), beta a learned scalar (zero-initialised, trained with
  the head): the length expert beta * l explains what length explains, so the head need not. At inference the
  expert is dropped: the saved model is the head alone, beta goes to its training record.
- `decorrelate` (after ODIN, Chen et al. 2024, "ODIN: disentangled reward mitigates hacking in RLHF"): the loss
  plus lambda * |Pearson(r_c - r_r, l_c - l_r)| over the batch's pairs.

l is a response's token count (from its first content token through the end-of-turn token the reward is read at,
as tokenised: the cache index's `n_response_tokens`, a batch's `response_mask`; a response that left truncation
cut counts the tokens kept), divided by the standard deviation of the training pairs' differences l_c - l_r, so
beta and lambda do not depend on the tokenizer's scale. (The whole sequence's count would do for pairs that share
their prompt, but not once truncation to max_length cuts the prompt: both sides then count max_length.)

Where the papers are unclear or differ from what is built here, what we chose:
- Shen et al.'s length expert is a smaller language model and the main expert sees perturbed inputs; here the
  expert is the simplest one the issue names, linear in length, and the inputs are not perturbed.
- ODIN trains two heads (one correlated with length, one orthogonal to it) and keeps the second; here the one
  head is penalised, on pair margins (what the pairwise loss sees) rather than on single rewards; a batch whose
  margins or lengths do not vary (the zero-initialised head's first step, one pair) adds nothing.
- The validation loss and accuracy (epoch selection) are the head's alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sarm.errors import SarmError
from sarm.variants.spec import LENGTH_DEBIAS

TINY = 1e-12


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors, differentiable; 0 where either does not vary."""
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / ((x * x).sum() * (y * y).sum()).clamp_min(TINY).sqrt()


class LengthDebias(nn.Module):
    """The length term of a pairwise objective; its parameters (beta of `poe`) train with the head."""

    def __init__(self, method: str, weight: float = 1.0, scale: float = 1.0):
        super().__init__()
        if method not in LENGTH_DEBIAS:
            raise ValueError(f"length_debias {method!r} is not one of {LENGTH_DEBIAS}")
        self.method, self.weight, self.scale = method, float(weight), float(scale)
        # shape [1], not a 0-d scalar: DeepSpeed ZeRO-3 cannot broadcast or shard a 0-d parameter
        self.beta = nn.Parameter(torch.zeros(1)) if method == "poe" else None

    def forward(self, margin: torch.Tensor, differences: torch.Tensor, loss: Callable) -> torch.Tensor:
        """`loss` (of the pairs' margins r_c - r_r) with the length term; `differences`: l_c - l_r in tokens."""
        lengths = differences.to(margin.dtype) / self.scale
        if self.beta is not None:
            return loss(margin + self.beta.to(margin.dtype) * lengths)
        return loss(margin) + self.weight * pearson(margin, lengths).abs()

    def record(self) -> dict:
        """What the trained model's training record keeps: the method, its weight or the learned beta, the scale."""
        out = {"length_debias": self.method, "length_scale_tokens": self.scale}
        if self.beta is not None:
            out["length_beta"] = self.beta.item()
        else:
            out["length_weight"] = self.weight
        return out


def length_scale(differences) -> float:
    """The standard deviation of the training pairs' length differences (1 when they do not vary)."""
    std = torch.as_tensor(differences, dtype=torch.float64).std().item() if len(differences) > 1 else 0.0
    return std if std > 0 else 1.0


def length_debias(spec: dict, differences) -> LengthDebias | None:
    """The length term a reward-model spec (`as_dict()`) asks for, scaled to the training pairs' `differences`
    (l_c - l_r in tokens), or None (plain training)."""
    if spec.get("length_debias") is None:
        return None
    return LengthDebias(spec["length_debias"], spec.get("length_weight", 1.0), length_scale(differences))


def response_tokens(encoded) -> int:
    """A tokenised sequence's response length l (an `activations.Encoded`)."""
    return len(encoded.input_ids) - encoded.response_start


def cached_differences(cache) -> torch.Tensor:
    """l_c - l_r in tokens per pair of an ActivationCache (rows of seq 2i / 2i+1: pair i's chosen / rejected)."""
    index = cache.index
    if "n_response_tokens" not in index.columns:
        raise SarmError(
            f"{cache.folder}: cached before its index kept each response's token count (a length-debiased head "
            "needs it); re-run the rule that cached it"
        )
    tokens = torch.tensor(index.sort_values("seq")["n_response_tokens"].to_numpy(), dtype=torch.float32)
    return tokens[0::2] - tokens[1::2]


def planned(spec: dict) -> dict:
    """The training record's keys a run's checkpoints must match before it learns beta: method and weight."""
    method = spec.get("length_debias")
    if method is None:
        return {}
    return {"length_debias": method, **({"length_weight": spec.get("length_weight", 1.0)} if method == "decorrelate" else {})}
