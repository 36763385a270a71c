"""Reward-model variants: a typed spec per kind (config key `reward_models.<name>.mode`), built once from the
config, and a registry keyed by kind. A new kind is one module defining a `RewardModelSpec` subclass decorated
with `@register("<mode>")`, plus its import below (the registration)."""

from sarm.variants.spec import (
    DEFAULT_REWARD_MODELS,
    Cost,
    RewardModelSpec,
    kinds,
    register,
    spec_from_config,
    spec_from_dict,
    specs_from_config,
    specs_from_dicts,
)

# the built-in kinds register themselves on import
from sarm.variants import frozen, tuned, full_depth, sparse_rm, multi_objective  # noqa: E402,F401  isort: skip
from sarm.variants.frozen import FrozenHead  # noqa: E402
from sarm.variants.full_depth import FullDepth  # noqa: E402
from sarm.variants.multi_objective import MultiObjective  # noqa: E402
from sarm.variants.sparse_rm import SparseRM  # noqa: E402
from sarm.variants.tuned import EndToEnd, FineTuned, Joint  # noqa: E402

__all__ = [
    "DEFAULT_REWARD_MODELS",
    "Cost",
    "EndToEnd",
    "FineTuned",
    "FrozenHead",
    "FullDepth",
    "Joint",
    "MultiObjective",
    "RewardModelSpec",
    "SparseRM",
    "kinds",
    "register",
    "spec_from_config",
    "spec_from_dict",
    "specs_from_dicts",
    "specs_from_config",
]
