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
