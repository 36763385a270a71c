"""The saved reward model: its folder format, loading, and the one scoring interface every kind implements.

Two formats, told apart by `format` in the folder's `reward_model.json`:

- `sarm-reward-model`, a head over features (`RewardModel`): truncated LM -> standardise -> SAE encoder (TopK
  latents; SARM) or the standardised hidden state itself (the dense head) -> linear head, no bias:
  r = sum_i w_i z_i at the final token. The folder holds `reward_model.json` (all it takes to rebuild it),
  `head.safetensors`, the SAE in sae-lens format under `sae/` for SARM, and a fine-tuned backbone under
  `backbone/` when its layers 1..L were trained;
- `sarm-sparse-rm` (`ProjectionRewardModel`, SparseRM, arXiv 2511.07896): truncated LM -> standardise -> the
  projections of the state onto m unit SAE decoder directions (preference-relevant latents chosen in training)
  -> z-scored -> a small MLP. The folder holds `reward_model.json` (with the chosen latent ids and their mean
  activation differences) and `head.safetensors` (the m directions, the projections' mean and std, the MLP);
  no SAE: the m directions are all it reads;
- `sarm-multi-objective` (`sarm.gated_reward_model.GatedRewardModel`, ArmoRM-style): one linear head per objective
  over the response's features, mixed by a softmax gate over the prompt's features;
- `hf-sequence-classifier` (`ClassifierRewardModel`): a full-depth AutoModelForSequenceClassification.

`load(path)` reads any of them. All score raw text with `score(prompts, responses)`; a head over features (and
SparseRM) also scores cached hidden states (`score_hidden`); a linear head over features (`linear_head`) splits
a reward into per-feature contributions; every kind gives the reward at each token of a response
(`token_rewards`, `sarm.token_rewards`). Training lives beside this module: `sarm.reward` fits heads on cached
states, `sarm.variants.sparse_rm` fits SparseRM on them, `sarm.finetune` trains end to end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sae_lens.saes.topk_sae import TopK
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sarm import activations, models
from sarm import token_rewards as per_token
from sarm.errors import SarmError
from sarm.sae import load_sae, save_sae

CONFIG_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"
SAE_DIR = "sae"
FEATURE_KINDS = ("sae", "hidden")
CLASSIFIER_FORMAT = "hf-sequence-classifier"
SPARSE_RM_FORMAT = "sarm-sparse-rm"
MULTI_OBJECTIVE_FORMAT = "sarm-multi-objective"


@dataclass(frozen=True)
class SparseFeatures:
    """TopK latents of n rows as (indices [n, k], values [n, k]): row i is zero except values[i] at indices[i].

    What `train_head` needs of a dense [n, width] tensor (`shape`, `len`, row indexing, `@ weight`) works on
    it with k numbers a row instead of width: 77k pairs x 2 x 65,536 latents take 40 GB dense, 0.24 GB here (k = 192).
    """

    indices: torch.Tensor  # int32: a row's k latent ids
    values: torch.Tensor  # float32: their activations (a TopK slot that ReLU zeroed holds 0)
    width: int  # d_sae

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.indices), self.width))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows) -> SparseFeatures:
        return SparseFeatures(self.indices[rows], self.values[rows], self.width)

    def __matmul__(self, weight: torch.Tensor) -> torch.Tensor:
        """features @ weight: sum_j values[i, j] * weight[indices[i, j]] (differentiable in `weight`)."""
        return (self.values * weight[self.indices]).sum(-1)

    def to_dense(self) -> torch.Tensor:
        return torch.zeros(self.shape).scatter_(1, self.indices.long(), self.values)

    @property
    def nbytes(self) -> int:
        return self.indices.nbytes + self.values.nbytes


@torch.no_grad()
def sae_features(sae, hidden: torch.Tensor, batch_size: int = 1024, sparse: bool = False) -> torch.Tensor | SparseFeatures:
    """TopK latents of standardised hidden states: [n, d_sae] in float32, or with `sparse` (and a TopK SAE,
    i.e. one whose cfg has `k`) the same latents as `SparseFeatures`, never holding more than one dense
    chunk of `batch_size` rows (1024 x 65,536 latents: 0.27 GB)."""
    dtype, device = sae.W_enc.dtype, sae.W_enc.device
    topk_on = isinstance(getattr(sae, "activation_fn", None), TopK)  # not when `set_topk` turned it off
    k = getattr(sae.cfg, "k", None) if sparse and topk_on else None
    chunks = []
    for start in range(0, len(hidden), batch_size):
        z = sae.encode(hidden[start : start + batch_size].to(device, dtype))
        z = z.to_dense() if z.is_sparse else z
        if k is None:
            chunks.append(z.float().cpu())
        else:
            values, indices = z.topk(k, dim=-1, sorted=False)  # exactly the non-zeros (plus zeros if ReLU cut some)
            chunks.append((indices.to(torch.int32).cpu(), values.float().cpu()))
    if k is None:
        return torch.cat(chunks) if chunks else torch.zeros(0, sae.cfg.d_sae)
    return SparseFeatures(
        torch.cat([i for i, _ in chunks]) if chunks else torch.zeros(0, k, dtype=torch.int32),
        torch.cat([v for _, v in chunks]) if chunks else torch.zeros(0, k),
        sae.cfg.d_sae,
    )


def strip_trailing(text: str, tokens: list[str]) -> str:
    """`text` without its trailing `tokens` (tried longest first), in any number, with the whitespace around
    them (whitespace left before the first is kept): linear in what is stripped (an end index moves left;
    the text is copied once), where stripping by copies was quadratic."""
    end = len(text)
    while True:
        stop = end
        while stop and text[stop - 1].isspace():  # what str.rstrip() drops
            stop -= 1
        token = next((t for t in tokens if text.endswith(t, 0, stop)), None)
        if token is None:
            return text[:end]
        end = stop - len(token)


class RewardModel:
    """A trained SARM (or dense-baseline) reward model; see the module docstring for its folder."""

    linear_head = True  # the reward is sum_i w_i z_i: per-feature contributions, explanation, RL audit apply
    scores_rendered_texts = True  # `score_texts`: a conversation rendered elsewhere (the reward is read at its end)
    gives_token_rewards = True  # `token_rewards`: the head applied at each token of the response

    def __init__(self, config: dict, weight: torch.Tensor, sae=None, trust_remote_code: bool = False):
        if config["features"] not in FEATURE_KINDS:
            raise SarmError(f"reward model: unknown features {config['features']!r} (one of {FEATURE_KINDS})")
        if config["features"] == "sae":
            if sae is None:
                raise SarmError("a SARM reward model needs its SAE")
            if sae.cfg.d_sae != len(weight):
                raise SarmError(f"the SAE has {sae.cfg.d_sae} latents but the head has {len(weight)} weights")
        self.config, self.weight, self.sae = config, weight.float(), sae
        if sae is not None:
            set_topk(sae, config.get("topk", True))
        self._init_text_path(trust_remote_code)

    def _init_text_path(self, trust_remote_code: bool) -> None:
        """No backbone loaded yet (`load_backbone` loads it on first use), on the CPU until told otherwise."""
        self.device = "cpu"
        self._backbone = self._tokenizer = None
        # Python shipped with the base model runs only when whoever loads the model says so, never because
        # the folder's reward_model.json asks for it.
        self.trust_remote_code = trust_remote_code

    # --- features and scores from cached (standardised) hidden states ---
    def features(self, hidden: torch.Tensor, sparse: bool = False) -> torch.Tensor | SparseFeatures:
        """The head's inputs; with `sparse`, TopK latents as (indices, values) (dense where TopK is off)."""
        return sae_features(self.sae, hidden, sparse=sparse) if self.config["features"] == "sae" else hidden.float()

    def score_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.features(hidden) @ self.weight

    @property
    def n_features(self) -> int:
        """How many features the head reads."""
        return len(self.weight)

    def score_cache(self, cache) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Rewards of every sequence of an `ActivationCache`, and per-sequence detail columns (none here; a
        multi-objective model gives each objective's score and the gate's weights)."""
        return self.score_hidden(cache.final()), {}

    def contributions(self, features: torch.Tensor) -> torch.Tensor:
        """w_i * z_i per feature: each row sums to that sequence's reward."""
        return features * self.weight

    # --- raw text, end to end ---
    def load_backbone(self, device: str = "cpu") -> None:
        where = getattr(self, "folder", "reward model")
        base = {
            **self.config["base_model"],
            "trust_remote_code": remote_code(self.config["base_model"], self.trust_remote_code, where),
        }
        if not self.backbone_path.exists():
            raise SarmError(
                f"{where}: its base model {self.backbone_path} does not exist (was the folder moved to another "
                f"machine?); set base_model.path in its {CONFIG_FILE} to the base model folder there"
            )
        self._tokenizer, self._backbone, self.device, self._backbone_meta = models.load_backbone(base, self.backbone_path, device)
        if self.sae is not None:
            self.sae.to(self.device)

    def backbone(self, device: str | None = None) -> tuple:
        """(tokenizer, truncated model, device, meta) this model reads its states with, loaded as `score` loads them:
        for a fine-tuned model its own layers 1..L (`backbone/` in its folder). `sarm.activations.cache_sequences`
        takes them, so that a cache made with them scores as `score` does (a tuned SARM's attributions, cards,
        preference shift and best-of-N read such caches)."""
        if self._backbone is None:
            self.load_backbone(device or self.device)
        meta = {**self._backbone_meta, "backbone": str(self.backbone_path.resolve())}
        if self.config.get("sae_input"):  # raw states for a pretrained SAE that normalises them itself
            meta["sae_input"] = self.config["sae_input"]
        return self._tokenizer, self._backbone, self.device, meta

    @torch.no_grad()
    def hidden(self, prompts: list, responses: list[str], batch_size: int = 16) -> torch.Tensor:
        """Standardised final-token states of each (prompt, response); a prompt is a string or messages."""
        return self.hidden_encoded(self.encode(prompts, responses), batch_size)

    def score(self, prompts: list, responses: list[str], batch_size: int = 16) -> np.ndarray:
        """Rewards of (prompt, response) pairs from raw text."""
        return self.score_encoded(self.encode(prompts, responses), batch_size).numpy()

    def score_encoded(self, encoded: list[activations.Encoded], batch_size: int = 16) -> torch.Tensor:
        """Rewards of already tokenised sequences (`encode`)."""
        return self.score_hidden(self.hidden_encoded(encoded, batch_size))

    def encode(self, prompts: list, responses: list[str]) -> list[activations.Encoded]:
        """Chat-templated, left-truncated token ids of each (prompt, response), as `hidden` reads them."""
        if len(prompts) != len(responses):
            raise SarmError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self._backbone is None:
            self.load_backbone(self.device)
        max_length = self.config["base_model"]["max_length"]
        return [activations.encode(self._tokenizer, messages(p), r, max_length) for p, r in zip(prompts, responses)]

    def encode_texts(self, texts: list[str]) -> list[activations.Encoded]:
        """Token ids of conversations already rendered with the chat template (e.g. OpenRLHF's queries).

        Trailing whitespace and trailing end-of-turn / EOS / pad tokens are dropped and one end-of-turn token
        is put back, so the reward is read where `encode` reads it whether or not the text ends in it (and
        however much padding follows): the chat-templated text of (prompt, response) scores as `score` does.
        """
        if self._backbone is None:
            self.load_backbone(self.device)
        end, trailing = self._end_of_turn()
        max_length = self.config["base_model"]["max_length"]
        out = []
        for text in texts:
            out.append(activations.encode_text(self._tokenizer, strip_trailing(text, trailing) + end, max_length))
        return out

    def _end_of_turn(self) -> tuple[str, list[str]]:
        """The token that closes an assistant turn in this chat template, and the tokens to strip at a text's end."""
        if getattr(self, "_eot", None) is None:
            rendered = activations.render(self._tokenizer, [{"role": "user", "content": "x"}], "y")
            end = self._tokenizer.decode([self._tokenizer(rendered, add_special_tokens=False)["input_ids"][-1]])
            specials = {end, self._tokenizer.eos_token, self._tokenizer.pad_token}
            self._eot = end, sorted((t for t in specials if t), key=len, reverse=True)
        return self._eot

    def hidden_encoded(self, encoded: list[activations.Encoded], batch_size: int = 16) -> torch.Tensor:
        """Standardised final-token states of already tokenised sequences, in length-sorted batches."""
        return self.states_encoded(encoded, batch_size)[0]

    @torch.no_grad()
    def states_encoded(self, encoded: list[activations.Encoded], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-token states, prompt states) of already tokenised sequences, as a cache holds them."""
        if self._backbone is None:
            self.load_backbone(self.device)
        final = torch.empty(len(encoded), self.config["hidden_size"])
        prompt = torch.empty_like(final)
        for batch in activations.length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
            final[batch], _, prompt[batch] = activations.forward_batch(
                self._backbone,
                [encoded[i] for i in batch],
                self._tokenizer.pad_token_id,
                self.device,
                False,
                self.standardized,
            )
        return final, prompt

    @property
    def standardized(self) -> bool:
        """Whether the head reads per-token standardised states (False: raw, for a public SAE that normalises itself)."""
        return self.config.get("standardize", {}).get("per_token", True)

    def score_texts(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        """Rewards of conversations already rendered with the chat template (see `encode_texts`)."""
        return self.score_hidden(self.hidden_encoded(self.encode_texts(texts), batch_size)).numpy()

    # --- per-token rewards (sarm.token_rewards) ---
    def token_rewards(self, prompt, response: str, top_k: int = 0) -> per_token.TokenRewards:
        """The head applied at each token of the response through the final token (whose value is `score`'s);
        `top_k`: each token's largest feature contributions (a linear head)."""
        return self.token_rewards_batch([prompt], [response], top_k=top_k)[0]

    def token_rewards_batch(self, prompts: list, responses: list[str], batch_size: int = 16, top_k: int = 0) -> list:
        return per_token.of_feature_head(self, self.encode(prompts, responses), batch_size, top_k)

    # --- persistence ---
    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors().items()}, path / HEAD_FILE)
        if self.sae is not None:
            save_sae(self.sae, path / SAE_DIR)
        (path / CONFIG_FILE).write_text(json.dumps(self._config_to_save(path), indent=2))
        return path

    def _config_to_save(self, path: Path) -> dict:
        """The config as saved in folder `path`: a relative base-model path that does not resolve there (an edited
        copy saved elsewhere) becomes absolute."""
        config = json.loads(json.dumps(self.config))
        if not Path(config["base_model"]["path"]).is_absolute() and not (path / config["base_model"]["path"]).exists():
            config["base_model"]["path"] = str(self.backbone_path.resolve())
        return config

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `head.safetensors` holds."""
        return {"weight": self.weight}

    @classmethod
    def _from_folder(cls, config: dict, path: Path, trust_remote_code: bool) -> RewardModel:
        weight = _load_tensors(path / HEAD_FILE, ["weight"])["weight"]
        sae = load_sae(path / SAE_DIR) if config["features"] == "sae" else None
        return cls(config, weight, sae, trust_remote_code)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> RewardModel:
        """The model saved in folder `path`. `trust_remote_code`: allow the base model's own Python code (the
        caller's decision: the folder's `base_model.trust_remote_code` alone never runs it)."""
        path = Path(path)
        model = cls._from_folder(_read_config(path), path, trust_remote_code)
        model.device = models.resolve_device(device)
        model.folder = path
        return model

    @property
    def backbone_path(self) -> Path:
        """The base model folder; a relative path (a fine-tuned backbone saved inside the model) is read
        relative to the reward-model folder."""
        path = Path(self.config["base_model"]["path"])
        return path if path.is_absolute() else Path(getattr(self, "folder", ".")) / path


def build_mlp(m: int, hidden: int) -> torch.nn.Module:
    """SparseRM's reward head over m z-scored projections: Linear(m, hidden) -> ReLU -> Linear(hidden, 1), or with
    `hidden` 0 one Linear(m, 1); the output layer has no bias (pairwise losses cannot see one)."""
    if hidden == 0:
        return torch.nn.Sequential(torch.nn.Linear(m, 1, bias=False))
    return torch.nn.Sequential(torch.nn.Linear(m, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1, bias=False))


class ProjectionRewardModel(RewardModel):
    """A trained SparseRM (format `sarm-sparse-rm`, see the module docstring): the text path is RewardModel's
    (same backbone, same standardised final-token state), the head is an MLP over the state's projections onto
    m unit SAE decoder directions. Its reward is no sum over features: no `weight`, no `contributions`."""

    linear_head = False
    TENSORS = ("directions", "proj_mean", "proj_std")

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], trust_remote_code: bool = False):
        head = config["sparse_rm"]
        directions = tensors["directions"].float()
        m = len(head["latents"])
        if directions.shape != (m, config["hidden_size"]):
            raise SarmError(
                f"SparseRM: {m} latents of {config['hidden_size']}-wide states, but directions of shape {tuple(directions.shape)}"
            )
        self.config, self.sae, self.directions = config, None, directions
        self.proj_mean, self.proj_std = tensors["proj_mean"].float(), tensors["proj_std"].float()
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the caller's RNG alone
            self.mlp = build_mlp(m, head["mlp_hidden"])
        try:
            self.mlp.load_state_dict({k.removeprefix("mlp."): v.float() for k, v in tensors.items() if k.startswith("mlp.")})
        except RuntimeError as err:
            raise SarmError(
                f"SparseRM: its MLP weights do not fit mlp_hidden = {head['mlp_hidden']} over {m} projections "
                f"({str(err).splitlines()[0]}); re-run the rule that trained it"
            ) from None
        self.mlp.eval().requires_grad_(False)
        self._init_text_path(trust_remote_code)

    @property
    def n_features(self) -> int:
        return len(self.directions)

    def features(self, hidden: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        """The projections <h, d_j> of each state onto the m unit decoder directions: [n, m]."""
        return hidden.float() @ self.directions.T

    def head(self, projections: torch.Tensor) -> torch.Tensor:
        """The MLP's reward of [n, m] projections (differentiable: training calls it)."""
        return self.mlp((projections - self.proj_mean) / self.proj_std).squeeze(-1)

    def score_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.features(hidden))

    def contributions(self, features: torch.Tensor) -> torch.Tensor:
        raise SarmError("a SparseRM reward is an MLP over projections, not a sum of per-feature contributions")

    def tensors(self) -> dict[str, torch.Tensor]:
        mlp = {f"mlp.{k}": v.detach().contiguous() for k, v in self.mlp.state_dict().items()}
        return {"directions": self.directions, "proj_mean": self.proj_mean, "proj_std": self.proj_std, **mlp}

    @classmethod
    def _from_folder(cls, config: dict, path: Path, trust_remote_code: bool) -> ProjectionRewardModel:
        return cls(config, _load_tensors(path / HEAD_FILE, list(cls.TENSORS)), trust_remote_code)


def _load_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with one line naming the file when it is missing, corrupt, truncated,
    lacks one of `keys` or holds a non-finite number."""
    try:
        tensors = load_file(path)
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise KeyError(f"no tensor {missing[0]!r}")
    except FileNotFoundError:
        raise SarmError(f"{path}: missing; re-run the rule that trained this reward model") from None
    except (SafetensorError, KeyError, OSError) as err:
        raise SarmError(
            f"{path}: corrupt or truncated ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "re-run the rule that trained this reward model"
        ) from None
    if not all(torch.isfinite(tensor).all() for tensor in tensors.values()):
        raise SarmError(f"{path}: non-finite weights; re-run the rule that trained this reward model")
    return tensors


def check_finite(rewards, model, source) -> None:
    """Stop on a non-finite reward, naming the model and where its inputs came from: a NaN score would count as
    a wrong pair (or a lost best-of-N pick) with exit 0. (RL's reward function says it its own way.)"""
    rewards = np.asarray(rewards, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
        where = getattr(model, "folder", None) or getattr(model, "path", None) or "the reward model"
        raise SarmError(
            f"{where}: {len(bad)} of {len(rewards)} rewards from {source} are not finite (the first: "
            f"sequence {int(bad[0])}); its weights or inputs hold NaN or inf"
        )


def remote_code(base: dict, allowed: bool, where) -> bool:
    """Whether to run the Python code a base model ships (transformers' trust_remote_code): `allowed`, the decision
    of whoever loads the model. A folder whose `base_model.trust_remote_code` asks for it while the caller did not
    allow it is refused with one line saying how to allow it."""
    if base.get("trust_remote_code") and not allowed:
        raise SarmError(
            f"{where}: its base model runs its own Python code (base_model.trust_remote_code in its "
            f"{CONFIG_FILE}); allow it only if you trust {base.get('path')}: --trust-remote-code on the "
            "command line, trust_remote_code=True in Python"
        )
    return allowed


def messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def set_topk(sae, enabled: bool) -> None:
    """TopK on (the SAE as trained) or off, as the public recipe (`sarm_use_topk=false`): the head reads every
    latent's signed pre-activation W_enc (x - b_pre) + b_enc, no ReLU, no sparsity. sae-lens applies
    `activation_fn` inside `encode`, so nothing else changes."""
    k = getattr(sae.cfg, "k", None)
    if k is None:
        return  # not a TopK SAE (e.g. a pretrained ReLU SAE): nothing to switch
    sae.activation_fn = TopK(k) if enabled else torch.nn.Identity()


def base_model_config(model_spec: dict, model_dir, path: str | None = None) -> dict:
    """What a reward model records of its base model: where its backbone is (`path`, default the base model
    folder; a relative path is inside the reward-model folder), where it came from, and how it is read."""
    return {
        "name": model_spec["name"],
        "path": path or str(Path(model_dir).resolve()),
        "source": str(Path(model_dir).resolve()),
        "hub_id": model_spec.get("hub_id"),
        "layer": model_spec["layer"],
        "dtype": model_spec["dtype"],
        "max_length": model_spec["max_length"],
        "chat_template": model_spec.get("chat_template"),
        "trust_remote_code": model_spec.get("trust_remote_code", False),
    }


def model_config(
    spec: dict,
    model_spec: dict,
    model_dir,
    hidden_size: int,
    training: dict,
    base_path: str | None = None,
    sae_input: dict | None = None,
) -> dict:
    """The `reward_model.json` of a SARM or dense-head model: all it takes to rebuild and score it.
    `base_path`: a backbone saved inside the model folder (fine-tuned modes), relative to it. `sae_input`: the
    cached states' hook and normalisation, when a pretrained SAE chose them (sarm.sae_input; raw states are kept)."""
    config = {
        "format": "sarm-reward-model",
        "version": 1,
        "features": spec["features"],
        "sae_kind": spec.get("sae", "sequence") if spec["features"] == "sae" else None,
        "topk": spec.get("topk", True),
        "hidden_size": hidden_size,
        "base_model": base_model_config(model_spec, model_dir, base_path),
        "standardize": {"per_token": True, "eps": activations.STANDARDIZE_EPS},
        "read_at": "final token of the chat-templated prompt + response",
        "training": training,
    }
    if sae_input is not None:
        config["sae_input"] = sae_input
        if not sae_input["standardize"]:
            config["standardize"] = {"per_token": False}
    return config


def _final_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state at each right-padded sequence's last real token."""
    last = attention_mask.sum(-1) - 1
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


def classifier_rewards(classifier, input_ids, attention_mask) -> torch.Tensor:
    """Rewards of a sequence classifier at the last real token (HF locates it by pad id, which breaks when the
    pad token is the end-of-turn token the reward is read at, as in SmolLM2)."""
    base = getattr(classifier, classifier.base_model_prefix)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return classifier.score(_final_states(hidden, attention_mask)).squeeze(-1).float()


class ClassifierRewardModel:
    """A trained `full_depth` reward model: scores (prompt, response) text as RewardModel.score does."""

    def __init__(self, path: str | Path, device: str = "cpu", trust_remote_code: bool = False):
        self.path = Path(path)
        self.config = _read_config(self.path)
        self.device = models.resolve_device(device)
        self._model = self._tokenizer = None
        self.trust_remote_code = trust_remote_code  # the caller's decision, never the folder's (sarm.reward.remote_code)

    def _load(self):
        base = self.config["base_model"]
        trust = remote_code(base, self.trust_remote_code, self.path)
        self._tokenizer = models.load_tokenizer(self.path, base.get("chat_template"), trust)
        dtype = models.resolve_dtype(base["dtype"], self.device)
        from transformers import AutoModelForSequenceClassification

        self._model = (
            AutoModelForSequenceClassification.from_pretrained(self.path, dtype=dtype, trust_remote_code=trust)
            .to(self.device)
            .eval()
        )

    def encode(self, prompts: list, responses: list[str]) -> list[activations.Encoded]:
        if len(prompts) != len(responses):
            raise SarmError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self._model is None:
            self._load()
        max_length = self.config["base_model"]["max_length"]
        return [activations.encode(self._tokenizer, messages(p), r, max_length) for p, r in zip(prompts, responses)]

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str], batch_size: int = 16) -> np.ndarray:
        encoded = [e.input_ids for e in self.encode(prompts, responses)]
        out = np.empty(len(encoded), dtype=np.float64)
        for batch in activations.length_sorted_batches([len(e) for e in encoded], batch_size):
            ids, mask = activations.pad_right([encoded[i] for i in batch], self._tokenizer.pad_token_id)
            out[batch] = classifier_rewards(self._model, ids.to(self.device), mask.to(self.device)).cpu().numpy()
        return out

    def token_rewards(self, prompt, response: str, top_k: int = 0) -> per_token.TokenRewards:
        """Its score layer at each token of the response (no feature contributions: `top_k` is ignored)."""
        return self.token_rewards_batch([prompt], [response])[0]

    def token_rewards_batch(self, prompts: list, responses: list[str], batch_size: int = 16, top_k: int = 0) -> list:
        encoded = self.encode(prompts, responses)
        return per_token.of_classifier(self._model, self._tokenizer, encoded, self.device, batch_size)


def load(path: str | Path, device: str = "cpu", trust_remote_code: bool = False):
    """Any saved reward model folder: a `RewardModel` (a head over SAE latents or the hidden state, on the base or a
    fine-tuned backbone), a `ProjectionRewardModel` (SparseRM) or a `ClassifierRewardModel`. `trust_remote_code`: allow the base model's own Python code
    (the caller's decision, never taken from the folder)."""
    path = Path(path)
    kind = _read_config(path).get("format")
    if kind == CLASSIFIER_FORMAT:
        return ClassifierRewardModel(path, device, trust_remote_code)
    if kind == SPARSE_RM_FORMAT:
        return ProjectionRewardModel.from_pretrained(path, device, trust_remote_code)
    if kind == MULTI_OBJECTIVE_FORMAT:
        from sarm.gated_reward_model import GatedRewardModel  # it builds on this module

        return GatedRewardModel.from_pretrained(path, device, trust_remote_code)
    return RewardModel.from_pretrained(path, device, trust_remote_code)


def load_base_head(path: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> RewardModel:
    """A saved model that reads the base model's (or its own tuned) layers 1..L and scores with a head on their
    states (`RewardModel` and its kinds: what `sarm serve` batches); a sequence classifier is refused in one line."""
    model = load(path, device, trust_remote_code)
    if not isinstance(model, RewardModel):
        raise SarmError(f"{path}: a full-depth sequence classifier is not served; serve a reward model with a head on layer L")
    return model


def load_feature_head(path: str | Path, device: str = "cpu", trust_remote_code: bool = False) -> RewardModel:
    """A saved model whose reward is a sum over features (explanation, contributions, cached scoring): a
    `RewardModel`; a sequence classifier is refused in one line."""
    model = load(path, device, trust_remote_code)
    if not isinstance(model, RewardModel):
        raise SarmError(
            f"{path}: a full-depth sequence classifier has no feature head; name a reward model with a head "
            "over features (mode frozen, finetune or joint)"
        )
    if not model.linear_head:
        what = (
            "a SparseRM's reward is an MLP over projections"
            if isinstance(model, ProjectionRewardModel)
            else ("a multi-objective reward is a prompt-gated mix of heads")
        )
        raise SarmError(
            f"{path}: {what}, not a sum over features; name a reward model "
            "with a linear head over features (mode frozen, finetune or joint)"
        )
    return model


def _read_config(path: Path) -> dict:
    """The folder's `reward_model.json`, with one line when it is missing or unreadable."""
    if not (path / CONFIG_FILE).exists():
        raise SarmError(f"{path} is not a reward model folder (no {CONFIG_FILE})")
    try:
        return json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SarmError(f"{path / CONFIG_FILE}: not valid JSON ({type(err).__name__}); re-run the rule that trained it") from None
