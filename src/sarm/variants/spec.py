"""The reward-model spec: what one entry of config key `reward_models` is, typed, and the registry of its kinds.

A kind (config key `reward_models.<name>.mode`) is a subclass of `RewardModelSpec` that registers itself with
`@register("<mode>")`; its dataclass fields are the config keys it takes (besides `mode`). Everything the workflow
asks of a variant is answered here, never by comparing `mode` strings elsewhere: where it is trained (on cached
states or end to end), which SAE it reads, where it is scored from, what it saves, what it costs, and how it is
trained (`fit_cached` for the cached kinds, `build_trainable` for the end-to-end kinds). This module imports
nothing heavy: the workflow builds every spec at start, before any job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from sarm.errors import SarmError

FEATURE_KINDS = ("sae", "hidden")
SAE_KINDS = ("sequence", "token", "random")
DEFAULT_REWARD_MODELS = {"sarm": {"features": "sae"}, "dense": {"features": "hidden"}}
DEFAULT_KIND = "frozen"
LENGTH_DEBIAS = ("poe", "decorrelate")  # config key reward_models.<name>.length_debias (sarm.length_debias)
TRAINING_KEYS = ("length_debias", "length_weight")  # keys of every kind: options of its training objective

_KINDS: dict[str, type[RewardModelSpec]] = {}


def register(kind: str):
    """Class decorator: `kind` (a value of config key `reward_models.<name>.mode`) builds this spec class."""

    def add(cls):
        if kind in _KINDS and _KINDS[kind] is not cls:
            raise ValueError(f"reward-model kind {kind!r} is registered twice ({_KINDS[kind].__name__}, {cls.__name__})")
        cls.kind = kind
        _KINDS[kind] = cls
        return cls

    return add


def kinds() -> dict[str, type[RewardModelSpec]]:
    """The registered kinds, by mode name."""
    return dict(_KINDS)


@dataclass(frozen=True)
class Cost:
    """One job's planned needs: host memory and GPU memory (MB, unrounded), FLOPs, GPUs when on GPUs."""

    host_mb: float
    gpu_mem_mb: float
    flops: float
    gpus: int = 1


@dataclass(frozen=True)
class RewardModelSpec:
    """One reward model of the config. Subclasses set the class-level answers below and may add fields."""

    name: str
    features: str = "sae"  # the head reads SAE latents or the standardised hidden state
    sae: str | None = "sequence"  # which SAE: sequence-level, token-level, random-init (None: no SAE)
    topk: bool | None = True  # TopK on (as trained) or off (every latent's signed pre-activation)
    length_debias: str | None = None  # None: plain BT; "poe" / "decorrelate": see sarm.length_debias
    length_weight: float = 1.0  # lambda of "decorrelate"

    kind: ClassVar[str] = ""
    trains_on_cache: ClassVar[bool] = True  # fitted on cached states of the base model, else end to end on token ids
    own_backbone: ClassVar[bool] = False  # its layers 1..L change in training: its states are cached through them
    feature_head: ClassVar[bool] = True  # saved as a head over features (`RewardModel`), else a sequence classifier
    paper_head: ClassVar[bool] = False  # the paper's head (linear, on TopK latents of a frozen SAE): a Table 2 row
    linear_head: ClassVar[bool] = True  # its reward is a linear BT score of its representation (SparseRM's MLP: not)

    # --- building and checking, from the config ---
    @classmethod
    def from_config(cls, name: str, given: dict) -> RewardModelSpec:
        """The spec of config entry `reward_models.<name>` (its keys as given, `mode` included or not)."""
        key = f"config key reward_models.{name}"
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(given) - fields - {"mode"})
        if unknown:
            raise SarmError(
                f"{key}: {unknown[0]!r} is not a key of mode {cls.kind} (its keys: {', '.join(sorted(fields | {'mode'}))})"
            )
        values = {k: v for k, v in given.items() if k != "mode"}
        cls.check(key, values)
        spec = cls(name=name, **values)
        if spec.features == "hidden":
            spec = dataclasses.replace(spec, sae=None, topk=None)
        return spec

    @classmethod
    def check(cls, key: str, given: dict) -> None:
        """What the schema cannot say about this kind's keys; raise SarmError naming `key`."""
        if given.get("features", "sae") == "hidden" and ("sae" in given or "topk" in given):
            raise SarmError(f"{key}: sae and topk apply to features: sae only (this head reads the hidden state)")
        check_length_debias(key, given)

    def as_dict(self) -> dict:
        """The spec as the config gives it, every default filled in: the rules' params, what training records."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        return {"features": values.pop("features"), "mode": self.kind, **values}

    def matches(self, pattern: dict) -> bool:
        """Whether every key of `pattern` (e.g. `{"mode": "finetune"}`) has its value in this spec."""
        return all(self.as_dict().get(key) == value for key, value in pattern.items())

    # --- what the workflow asks ---
    @property
    def reads_sae(self) -> str | None:
        """The SAE kind its training needs (the workflow's `sae_folder(kind)`), or None."""
        return self.sae if self.features == "sae" else None

    @property
    def scored_from_cache(self) -> bool:
        """Scored from the base model's cached states (its backbone is the base model's), else from the text."""
        return not self.own_backbone and self.feature_head

    @property
    def contributions_per_feature(self) -> bool:
        """A reward that is sum_i w_i z_i over saved features: per-feature contributions (the RL audit, the server)."""
        return self.feature_head and self.linear_head

    @property
    def explainable(self) -> bool:
        """A linear head over SAE latents: feature cards, attributions and the preference shift apply."""
        return self.contributions_per_feature and self.features == "sae"

    # --- cost (sarm.workflow.resources sizes the jobs with these) ---
    def training_cost(self, config: dict, shape, gpu: bool) -> Cost:
        raise NotImplementedError

    def scoring_cost(self, config: dict, shape, table: str, gpu: bool) -> Cost:
        raise NotImplementedError

    # --- training ---
    def fit_cached(
        self, train, val, model_dir, model_spec: dict, settings: dict, sae=None, seed: int = 0, log=None, checkpoint_root=None
    ):
        """A kind trained on cached states: (the trained `RewardModel`, its history)."""
        raise SarmError(f"reward model {self.name}: mode {self.kind} is not trained on cached states")

    def build_trainable(self, model_dir, model_spec: dict, sae, tokenizer):
        """A kind trained end to end: the torch module `sarm.finetune` trains."""
        raise SarmError(f"reward model {self.name}: mode {self.kind} is not trained end to end")


def check_length_debias(key: str, given: dict) -> None:
    """The keys every kind takes for a length-debiased objective (`TRAINING_KEYS`); raise SarmError naming one."""
    method = given.get("length_debias")
    if method is not None and method not in LENGTH_DEBIAS:
        raise SarmError(f"{key}.length_debias: {method!r} is not one of null, {', '.join(LENGTH_DEBIAS)}")
    weight = given.get("length_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise SarmError(f"{key}.length_weight: {weight!r} must be a number >= 0")
    if "length_weight" in given and method != "decorrelate":
        raise SarmError(f"{key}.length_weight: it weighs length_debias: decorrelate only (here {method!r})")


def spec_from_config(name: str, given: dict) -> RewardModelSpec:
    """The typed spec of config entry `reward_models.<name>`, by its `mode`."""
    mode = given.get("mode", DEFAULT_KIND)
    if mode not in _KINDS:
        raise SarmError(
            f"config key reward_models.{name}.mode: {mode!r} is not a reward-model kind (one of: {', '.join(sorted(_KINDS))})"
        )
    return _KINDS[mode].from_config(name, given)


def specs_from_config(config: dict) -> dict[str, RewardModelSpec]:
    """Config key `reward_models` as typed specs (call it on the config as given: the defaults are filled here)."""
    return {
        name: spec_from_config(name, dict(given or {}))
        for name, given in (config.get("reward_models") or DEFAULT_REWARD_MODELS).items()
    }


def specs_from_dicts(values: dict[str, dict]) -> dict[str, RewardModelSpec]:
    """The specs again from their `as_dict()` by name (a rule's params)."""
    return {name: spec_from_dict(name, spec) for name, spec in values.items()}


def spec_from_dict(name: str, values: dict[str, Any]) -> RewardModelSpec:
    """The spec again from its `as_dict()` (a rule's params, checked when the config was read)."""
    cls = _KINDS[values.get("mode", DEFAULT_KIND)]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(name=name, **{k: v for k, v in values.items() if k in fields})  # an older record's extra keys dropped
