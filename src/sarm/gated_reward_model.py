"""The saved multi-objective reward model (format `sarm-multi-objective`, `GatedRewardModel`; trained by
`sarm.variants.multi_objective`): K linear heads over the response's features, one per objective, mixed by a gate
over the prompt's features (ArmoRM's shape, arXiv 2406.12845):

    r = sum_k g_k(prompt) r_k(response),  r_k = w_k . z(response),  g = softmax((V z(prompt) + b) / T).

z is the feature map of a frozen head (`features: sae`: SAE latents of the standardised state; `hidden`: the
standardised state itself), read at the final token for the response and at the last token before the response
(`sarm.activations.prompt_position`) for the prompt. The folder holds `reward_model.json` (with the objectives,
their categories and the gate's temperature), `head.safetensors` (`heads` [K, F], `gate.weight` [K, F],
`gate.bias` [K]) and the SAE under `sae/` for `features: sae`.

For one prompt the gate is fixed, so r is linear in the response's features: `attributions` splits a reward into
g_k w_k,i z_i per (objective, feature). It is no single linear head (`linear_head` False): the explain stage, the
RL audit and the server's per-feature contributions do not read it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sarm import activations
from sarm.errors import SarmError
from sarm.reward_model import (
    HEAD_FILE,
    MULTI_OBJECTIVE_FORMAT,
    SAE_DIR,
    RewardModel,
    SparseFeatures,
    _load_tensors,
    set_topk,
)
from sarm.sae import load_sae

FORMAT = MULTI_OBJECTIVE_FORMAT
TENSORS = ("heads", "gate.weight", "gate.bias")


def linear(features: torch.Tensor | SparseFeatures, weight: torch.Tensor) -> torch.Tensor:
    """features @ weight.T for dense features [n, F] or `SparseFeatures`, and weight [K, F]: [n, K]
    (differentiable in `weight`)."""
    if isinstance(features, SparseFeatures):
        return (features.values.unsqueeze(-1) * weight.T[features.indices.long()]).sum(1)
    return features @ weight.T


class GatedRewardModel(RewardModel):
    """A trained multi-objective reward model; see the module docstring. Its text path is RewardModel's (same
    backbone, same standardised states), reading the prompt state in the same forward as the final one."""

    linear_head = False
    scores_rendered_texts = False  # the prompt's state is read where the response starts: a rendered text hides it
    gives_token_rewards = False

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], sae=None, trust_remote_code: bool = False):
        if config["features"] == "sae" and sae is None:
            raise SarmError("a multi-objective reward model over SAE latents needs its SAE")
        names = list(config["multi_objective"]["objectives"])
        width = sae.cfg.d_sae if config["features"] == "sae" else config["hidden_size"]
        for name, shape in (("heads", (len(names), width)), ("gate.weight", (len(names), width)), ("gate.bias", (len(names),))):
            if tuple(tensors[name].shape) != shape:
                raise SarmError(
                    f"multi-objective reward model: {name} has shape {tuple(tensors[name].shape)}, not {shape} "
                    f"({len(names)} objectives over {width} features); re-run the rule that trained it"
                )
        self.config, self.sae, self.heads = config, sae, tensors["heads"].float()
        self.gate_weight, self.gate_bias = tensors["gate.weight"].float(), tensors["gate.bias"].float()
        if sae is not None:
            set_topk(sae, config.get("topk", True))
        self._init_text_path(trust_remote_code)

    @property
    def objectives(self) -> list[str]:
        """The objectives' names, in the order of the heads and the gate's outputs."""
        return list(self.config["multi_objective"]["objectives"])

    @property
    def temperature(self) -> float:
        return float(self.config["multi_objective"]["gate_temperature"])

    # --- scores from states ---
    def gate(self, prompt_features, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The objectives' weights [n, K] (each row sums to 1) from prompt features; `weight`, `bias`: others
        than the saved ones (training passes its parameters)."""
        weight = self.gate_weight if weight is None else weight
        bias = self.gate_bias if bias is None else bias
        return torch.softmax((linear(prompt_features, weight) + bias) / self.temperature, dim=-1)

    def objective_scores(self, features) -> torch.Tensor:
        """r_k = w_k . z per objective: [n, K]."""
        return linear(features, self.heads)

    @torch.no_grad()
    def score_states(self, final: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rewards [n], objective scores [n, K], gate weights [n, K]) of final-token and prompt states."""
        scores = self.objective_scores(self.features(final, sparse=True))
        gate = self.gate(self.features(prompt, sparse=True))
        return (gate * scores).sum(-1), scores, gate

    def score_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        raise SarmError(
            "a multi-objective reward needs the prompt's state as well as the final one: score_states(final, "
            "prompt), score_cache(cache) or score(prompts, responses)"
        )

    def score_cache(self, cache) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Rewards of every cached sequence and, per sequence, each objective's score and the gate's weights
        (columns `objective_<name>`, `gate_<name>`)."""
        rewards, scores, gate = self.score_states(*cache.states("final", "prompt"))
        details = {f"objective_{name}": scores[:, k].numpy() for k, name in enumerate(self.objectives)}
        details.update({f"gate_{name}": gate[:, k].numpy() for k, name in enumerate(self.objectives)})
        return rewards, details

    def contributions(self, features: torch.Tensor) -> torch.Tensor:
        raise SarmError("a multi-objective reward has per-objective contributions, which depend on the prompt: use attributions")

    # --- raw text ---
    @property
    def n_features(self) -> int:
        return self.heads.shape[1]

    def score_encoded(self, encoded: list[activations.Encoded], batch_size: int = 16) -> torch.Tensor:
        """Rewards of tokenised (prompt, response) sequences (`encode`), the prompt state read in the same forward."""
        return self.score_states(*self.states_encoded(encoded, batch_size))[0]

    def score_texts(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        raise SarmError(
            "a multi-objective reward model reads the prompt's state, which a rendered conversation does not locate: "
            "score (prompt, response) pairs"
        )

    def token_rewards_batch(self, prompts: list, responses: list[str], batch_size: int = 16, top_k: int = 0) -> list:
        raise SarmError("a multi-objective reward model gives no per-token rewards (its gate reads the prompt's state)")

    # --- attribution ---
    def attributions(self, final: torch.Tensor, prompt: torch.Tensor) -> pd.DataFrame:
        """One sequence's reward split per (objective, feature): contribution g_k w_k,i z_i, largest |contribution|
        first, with the gate weight g_k, the head weight w_k,i and the activation z_i; features with z_i = 0 are
        left out. The contributions add up to the reward."""
        z = self.features(final.reshape(1, -1))[0]
        gate = self.gate(self.features(prompt.reshape(1, -1)))[0]
        active = torch.nonzero(z).flatten()
        frames = [
            pd.DataFrame(
                {
                    "objective": name,
                    "feature": active.numpy(),
                    "gate": float(gate[k]),
                    "weight": self.heads[k, active].numpy(),
                    "activation": z[active].numpy(),
                    "contribution": (gate[k] * self.heads[k, active] * z[active]).numpy(),
                }
            )
            for k, name in enumerate(self.objectives)
        ]
        table = pd.concat(frames, ignore_index=True)
        order = np.argsort(-table["contribution"].abs().to_numpy(), kind="stable")
        return table.iloc[order].reset_index(drop=True)

    # --- persistence ---
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"heads": self.heads, "gate.weight": self.gate_weight, "gate.bias": self.gate_bias}

    @classmethod
    def _from_folder(cls, config: dict, path: Path, trust_remote_code: bool) -> GatedRewardModel:
        sae = load_sae(path / SAE_DIR) if config["features"] == "sae" else None
        return cls(config, _load_tensors(path / HEAD_FILE, list(TENSORS)), sae, trust_remote_code)
