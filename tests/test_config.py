"""sarm.config: names that become folder or file names are one safe path component; one line names the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sarm.config import check
from sarm.errors import SarmError

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def config(**changes) -> dict:
    base = {
        "model": {"name": "tiny", "path": "/models/tiny", "layer": 2},
        "datasets": {"hh": {"path": "hh.jsonl", "format": "hh_rlhf"}},
        "train": {"datasets": ["hh"]},
    }
    return {**base, **changes}


def test_a_plain_config_passes():
    check(config(experiment="run-1.b", reward_models={"sarm": {}, "dense_2": {"features": "hidden"}}), SCHEMA)


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../x", "a\\b", "", "x" * 101, "a b", "-rf"])
@pytest.mark.parametrize("key", ["datasets", "reward_models", "model.name", "experiment"])
def test_a_name_that_is_not_one_safe_path_component_is_refused(key, name):
    if key == "datasets":
        given = config(datasets={name: {"path": "hh.jsonl", "format": "hh_rlhf"}}, train={"datasets": [name]})
    elif key == "reward_models":
        given = config(reward_models={name: {}})
    elif key == "model.name":
        given = config(model={"name": name, "path": "/models/tiny", "layer": 2})
    else:
        given = config(experiment=name)
    with pytest.raises(SarmError, match="^" + re.escape(f"config key {key}: {name!r} cannot be a name; it becomes a folder name")):
        check(given, SCHEMA)


def test_the_schema_alone_refuses_dot_dot_too():
    """Snakemake's own `validate` (which fills in the defaults) reads the same patterns."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    bad = config(datasets={"..": {"path": "hh.jsonl", "format": "hh_rlhf"}}, train={"datasets": [".."]})
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)
    assert not jsonschema.Draft202012Validator(schema).is_valid(config(model={"name": ".", "layer": 2}))


def test_an_unquoted_exponent_reads_as_the_number_it_is():
    """PyYAML (YAML 1.1) reads `lr: 1e-3` as the string '1e-3'; it was refused with a baffling type error."""
    import yaml

    given = config(**yaml.safe_load("sae: {lr: 1e-3}\nreward: {lr: 5E-2, weight_decay: 1e-4}\nfinetune: {lr: 4e-6}"))
    assert given["sae"]["lr"] == "1e-3"  # what PyYAML gives
    check(given, SCHEMA)
    assert given["sae"]["lr"] == 0.001 and given["reward"] == {"lr": 0.05, "weight_decay": 0.0001} and given["finetune"]["lr"] == 4e-6


def test_a_string_that_is_no_number_still_names_the_key():
    with pytest.raises(SarmError, match=r"^config key reward.lr: 'fast' is not of type 'number'$"):
        check(config(reward={"lr": "fast"}), SCHEMA)
