"""Config validation with one-line messages that name the key at fault."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from sarm.errors import SarmError


def check(config: dict, schema_path: str | Path) -> None:
    """Raise SarmError naming the first offending key (`config key model.layer: ...`)."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise SarmError(f"config key {key}: {error.message}")


REWARD_MODEL_DEFAULTS = {"features": "sae", "mode": "frozen", "sae": "sequence", "topk": True, "recon_weight": 1.0}
DEFAULT_REWARD_MODELS = {"sarm": {"features": "sae"}, "dense": {"features": "hidden"}}


def reward_model_specs(config: dict) -> dict[str, dict]:
    """Config key `reward_models` with every default filled in, after the checks the schema cannot make
    (call it on the config as given, before the schema fills in defaults)."""
    specs = {}
    for name, given in (config.get("reward_models") or DEFAULT_REWARD_MODELS).items():
        spec = {**REWARD_MODEL_DEFAULTS, **given}
        key = f"config key reward_models.{name}"
        if spec["features"] == "hidden" and ("sae" in given or "topk" in given):
            raise SarmError(f"{key}: sae and topk apply to features: sae only (this head reads the hidden state)")
        if spec["mode"] == "joint" and spec["features"] != "sae":
            raise SarmError(f"{key}.mode: joint trains an SAE, so it needs features: sae")
        if spec["mode"] == "full_depth" and set(given) - {"mode"}:
            raise SarmError(f"{key}: a full_depth model is a sequence classifier; give only mode")
        if spec["mode"] == "full_depth":
            spec.update(features="hidden", sae=None, topk=None)
        elif spec["features"] == "hidden":
            spec.update(sae=None, topk=None)
        specs[name] = spec
    return specs
