"""Config validation with one-line messages that name the key at fault."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import yaml

from sarm.errors import SarmError


# A name that becomes one path component (a folder or file name): never `.`, `..`, a separator or a hidden file.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_names(config: dict) -> None:
    """Raise SarmError naming the key when a name that becomes a folder or file name is not one safe component
    (`..` as a data set's name would make its cache folder the parent of every cache)."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    # a scalar that is not a string is the schema's to report (`is not of type 'string'`)
    named = [(key, [value]) for key, value in (("experiment", config.get("experiment")), ("model.name", model.get("name")))
             if isinstance(value, str)]
    for key in ("datasets", "reward_models"):
        if isinstance(config.get(key), dict):
            named.append((key, list(config[key])))
    for key, names in named:
        for name in names:
            if not (isinstance(name, str) and SAFE_NAME.fullmatch(name)):
                raise SarmError(
                    f"config key {key}: {name!r} cannot be a name; it becomes a folder name, so use letters, digits, "
                    "'.', '_' and '-', starting with a letter or digit (at most 100 characters)"
                )


# What YAML 1.1 (PyYAML) reads as a string but a person means as a number: `1e-3`, `5E+4`, `.5e1` (no dot needed).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce_numbers(config, schema: dict) -> None:
    """Turn the strings that the schema wants as numbers and that read as one (`lr: 1e-3`, which PyYAML keeps
    a string) into floats, in place; anything else is left for the schema to report."""
    if not isinstance(config, dict) or not isinstance(schema, dict):
        return
    properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
    for key, value in config.items():
        sub = properties.get(key, extra if isinstance(extra, dict) else None)
        if not isinstance(sub, dict):
            continue
        kinds = sub.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if isinstance(value, str) and "number" in kinds and _NUMBER.fullmatch(value.strip()):
            config[key] = float(value)
        elif isinstance(value, dict):
            coerce_numbers(value, sub)


def check(config: dict, schema_path: str | Path) -> None:
    """Raise SarmError naming the first offending key (`config key model.layer: ...`)."""
    check_names(config)
    schema = yaml.safe_load(Path(schema_path).read_text())
    coerce_numbers(config, schema)
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
