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
    named = [
        (key, [value])
        for key, value in (("experiment", config.get("experiment")), ("model.name", model.get("name")))
        if isinstance(value, str)
    ]
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


def check_references(config: dict) -> None:
    """What the schema cannot say: cross-references between keys (data sets named by train and eval exist,
    reserved table names, explain/shift tables, sae.k < sae.width, a model source, sae.pretrained's shape).
    Call it on the config with its defaults filled in (a missing section reads as its default); raise SarmError
    naming the key."""

    def section(key: str) -> dict:
        return config.get(key) if isinstance(config.get(key), dict) else {}

    names = set(config.get("datasets") or {})
    for key in ("train", "eval"):
        for name in section(key).get("datasets") or []:
            if name not in names:
                raise SarmError(f"config key {key}.datasets: {name!r} is not defined under datasets")
    evals = section("eval").get("datasets") or []
    for name in evals:
        if name in ("train", "val"):
            raise SarmError(f"config key eval.datasets: {name!r} is reserved for the training tables")
        if name in ("tokens", "corpus"):  # <activations>/<table> would hold the token-level and plain-text SAE caches
            raise SarmError(f"config key eval.datasets: {name!r} is reserved for the SAE corpus caches; rename the data set")
    tables = ["train", "val", *evals]
    for key in ("explain", "shift"):
        table = section(key).get("table")
        if table is not None and table not in tables:  # it becomes a folder of the activation cache
            raise SarmError(f"config key {key}.table: {table!r} is not one of the tables ({', '.join(tables)})")
    sae, model = section("sae"), section("model")
    if sae.get("width") is not None and sae.get("k") is not None and sae["k"] >= sae["width"]:
        raise SarmError(f"config key sae.k = {sae['k']} must be smaller than sae.width = {sae['width']}")
    if not (model.get("hub_id") or model.get("path") or model.get("gguf")):
        raise SarmError("config key model: give at least one of hub_id, path or gguf")
    pretrained = sae.get("pretrained")
    if pretrained and not (pretrained.get("path") or {"release", "sae_id"} <= set(pretrained)):
        raise SarmError("config key sae.pretrained: give {path: ...} or {release: ..., sae_id: ...}")


EXPLAIN_REWARD_MODEL = "sarm"  # config key explain.reward_model's default


def explain_reward_model(config: dict, specs: dict) -> str | None:
    """The reward model whose feature cards, attributions and preference shift the workflow writes (config key
    explain.reward_model; `specs` from sarm.variants.specs_from_config), or None when there is none to explain. It needs a
    linear head over SAE latents (features: sae, any mode but full_depth). The default name, `sarm`, is explained
    when it is such a model and quietly left out otherwise (a config without it has no explain outputs); any other
    name that is not such a model raises SarmError naming the key."""
    name = (config.get("explain") or {}).get("reward_model") or EXPLAIN_REWARD_MODEL
    spec = specs.get(name)
    if spec is not None and spec.explainable:
        return name
    if name == EXPLAIN_REWARD_MODEL:
        return None
    if spec is None:
        problem = f"{name!r} is not one of the reward models ({', '.join(specs)})"
    elif spec.features == "sae":  # not a linear head (SparseRM's MLP over projections)
        problem = f"{name!r} (mode {spec.kind}) has no linear head over SAE latents to explain"
    else:
        problem = f"{name!r} (mode {spec.kind}, features {spec.features}) has no SAE head to explain"
    raise SarmError(f"config key explain.reward_model: {problem}; name a reward model with features: sae")
