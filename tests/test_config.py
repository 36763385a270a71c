"""sarm.config: names that become folder or file names are one safe path component; one line names the key; the
cross-references between keys and the reward model the explain rules read, checked without Snakemake; the library
imports without Snakemake."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sarm.config import check, check_references, explain_reward_model
from sarm.errors import SarmError
from sarm.variants import specs_from_config

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
    with pytest.raises(
        SarmError, match="^" + re.escape(f"config key {key}: {name!r} cannot be a name; it becomes a folder name")
    ):
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
    assert (
        given["sae"]["lr"] == 0.001
        and given["reward"] == {"lr": 0.05, "weight_decay": 0.0001}
        and given["finetune"]["lr"] == 4e-6
    )


def test_a_string_that_is_no_number_still_names_the_key():
    with pytest.raises(SarmError, match=r"^config key reward.lr: 'fast' is not of type 'number'$"):
        check(config(reward={"lr": "fast"}), SCHEMA)


# --- sarm.config.check_references: the cross-references the schema cannot check, without Snakemake ---


def filled(**changes) -> dict:
    """A config as the workflow sees it after the schema filled in the defaults (the sections check_references reads)."""
    base = {
        "model": {"name": "tiny", "hub_id": None, "path": "/models/tiny", "gguf": None, "layer": 2},
        "datasets": {"hh": {"path": "hh.jsonl", "format": "hh_rlhf"}, "rb": {"path": "rb.jsonl", "format": "rewardbench"}},
        "train": {"datasets": ["hh"]},
        "eval": {"datasets": ["rb"]},
        "sae": {"width": 256, "k": 8, "pretrained": None},
        "explain": {"table": None},
        "shift": {"table": None},
    }
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        base[section] = {**base[section], key: value} if key else value
    return base


def test_a_consistent_config_passes_the_cross_checks():
    check_references(filled())
    check_references(filled(explain__table="rb", shift__table="val", sae__width=None, sae__k=None))
    check_references(filled(model__path=None, model__hub_id="org/model"))
    check_references(filled(sae__pretrained={"release": "gpt2-small-res-jb", "sae_id": "blocks.1.hook_resid_pre"}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train__datasets": ["nope"]}, "config key train.datasets: 'nope' is not defined under datasets"),
        ({"eval__datasets": ["rb", "nope"]}, "config key eval.datasets: 'nope' is not defined under datasets"),
        ({"eval__datasets": ["train"]}, "config key eval.datasets: 'train' is not defined under datasets"),
        (
            {"datasets__val": {"path": "v.jsonl", "format": "hh_rlhf"}, "eval__datasets": ["val"]},
            "config key eval.datasets: 'val' is reserved for the training tables",
        ),
        (
            {"datasets__tokens": {"path": "t.jsonl", "format": "hh_rlhf"}, "eval__datasets": ["tokens"]},
            "config key eval.datasets: 'tokens' is reserved for the SAE corpus caches; rename the data set",
        ),
        (
            {"datasets__corpus": {"path": "c.jsonl", "format": "hh_rlhf"}, "eval__datasets": ["corpus"]},
            "config key eval.datasets: 'corpus' is reserved for the SAE corpus caches; rename the data set",
        ),
        ({"explain__table": ".."}, "config key explain.table: '..' is not one of the tables (train, val, rb)"),
        ({"shift__table": "hh"}, "config key shift.table: 'hh' is not one of the tables (train, val, rb)"),
        ({"sae__k": 256}, "config key sae.k = 256 must be smaller than sae.width = 256"),
        ({"model__path": None}, "config key model: give at least one of hub_id, path or gguf"),
        (
            {"sae__pretrained": {"release": "gpt2-small-res-jb"}},
            "config key sae.pretrained: give {path: ...} or {release: ..., sae_id: ...}",
        ),
    ],
)
def test_a_broken_cross_reference_is_one_line_naming_the_key(changes, message):
    with pytest.raises(SarmError) as err:
        check_references(filled(**changes))
    assert str(err.value) == message


# --- sarm.config.explain_reward_model: which reward model the cards, attributions and preference shift explain ---

SAE_AND_DENSE = {"sarm": {"features": "sae"}, "dense": {"features": "hidden"}}


def explained(models: dict | None, name: str | None = None):
    config = {"reward_models": models, "explain": {} if name is None else {"reward_model": name}}
    return explain_reward_model(config, specs_from_config(config))


def test_the_default_explains_sarm():
    assert explained(None) == "sarm"  # the default reward models
    assert explained(SAE_AND_DENSE) == explained(SAE_AND_DENSE, "sarm") == "sarm"
    assert explained({"sarm": {"features": "sae", "mode": "finetune"}}) == "sarm"


def test_the_default_without_a_sarm_head_explains_nothing_and_says_nothing():
    """A config without a `sarm` SAE head had no explain outputs, and still has none: no error."""
    assert explained({"dense": {"features": "hidden"}}) is None
    assert explained({"sarm": {"features": "hidden"}}) is None
    assert explained({"sarm": {"mode": "full_depth"}}, "sarm") is None


def test_another_sae_head_is_explained_when_named():
    models = {"sarm": {"features": "sae"}, "other": {"features": "sae", "topk": False}}
    assert explained(models, "other") == "other"
    assert explained({"dense": {"features": "hidden"}, "tuned": {"mode": "joint"}}, "tuned") == "tuned"


@pytest.mark.parametrize(
    "models, name, message",
    [
        (SAE_AND_DENSE, "nope", "config key explain.reward_model: 'nope' is not one of the reward models (sarm, dense)"),
        (
            SAE_AND_DENSE,
            "dense",
            "config key explain.reward_model: 'dense' (mode frozen, features hidden) has no SAE head to explain",
        ),
        (
            {"sarm": {}, "bt": {"mode": "full_depth"}},
            "bt",
            "config key explain.reward_model: 'bt' (mode full_depth, features hidden) has no SAE head to explain",
        ),
        (
            {"sarm": {}, "tuned": {"features": "hidden", "mode": "finetune"}},
            "tuned",
            "config key explain.reward_model: 'tuned' (mode finetune, features hidden) has no SAE head to explain",
        ),
    ],
)
def test_a_named_model_without_an_sae_head_is_one_line_naming_the_key(models, name, message):
    with pytest.raises(SarmError) as err:
        explained(models, name)
    assert str(err.value) == message + "; name a reward model with features: sae"


# --- the workflow: explain.reward_model moves the outputs; a bad name stops the dry run with that line ---


def test_explain_outputs_follow_explain_reward_model_in_a_dry_run(tiny_model_dir, shared_data, tmp_path):
    from test_workflow import snakemake, tiny_config

    config = tiny_config(tiny_model_dir, shared_data)
    config["reward_models"] = {"sarm": {"features": "sae"}, "other": {"features": "sae", "topk": False}}
    config["explain"]["reward_model"] = "other"
    result = snakemake(tmp_path, config, "-n")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for path in (
        "results/explain/other/cards.html",
        "results/explain/other/attributions/rb-like.parquet",
        "results/explain/other/features.json",
        "results/shift/other/model",
        "results/reward/other",
    ):
        assert path in output
    assert "explain/sarm" not in output and "shift/sarm" not in output


def test_a_bad_explain_reward_model_stops_the_dry_run_naming_the_key(tiny_model_dir, shared_data, tmp_path):
    from test_workflow import snakemake, tiny_config

    config = tiny_config(tiny_model_dir, shared_data)
    config["reward_models"] = {"dense": {"features": "hidden"}}
    config["rl"] = {"reward": "dense"}  # its default is sarm
    config["explain"]["reward_model"] = "dense"
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    message = "config key explain.reward_model: 'dense' (mode frozen, features hidden) has no SAE head to explain"
    assert message in result.stdout + result.stderr
    # left at its default, the same config has no explain outputs and no error (as before the key)
    del config["explain"]["reward_model"]
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "explain/" not in result.stdout and "shift/" not in result.stdout


# --- the library without Snakemake (an optional dependency: the `workflow` extra) ---


def test_every_library_module_imports_without_snakemake():
    """`import sarm` and every sarm.* module but the workflow glue (sarm.workflow, which may import snakemake)
    load where snakemake is not installed: it is the `workflow` extra, not a dependency of the library."""
    script = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['snakemake'] = None  # `import snakemake` (and snakemake.x) raises ImportError\n"
        "import sarm\n"
        "names, packages = [], [sarm]\n"
        "while packages:  # every module and subpackage, each imported before its own modules are listed\n"
        "    package = packages.pop()\n"
        "    for found in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
        "        if found.name == 'sarm.workflow':\n"
        "            continue\n"
        "        module = importlib.import_module(found.name)\n"
        "        names.append(found.name)\n"
        "        if found.ispkg:\n"
        "            packages.append(module)\n"
        "print(' '.join(names))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert {"sarm.config", "sarm.explain", "sarm.reward", "sarm.cli", "sarm.serve"} <= set(result.stdout.split())


def test_the_library_never_imports_the_workflow_package():
    """The layers: rule names and Snakemake DAG walks live in sarm.workflow, which imports the library, never the
    reverse (module-level or inside a function); the schema and the variant registry import nothing heavy."""
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "sarm"
    offenders = []
    for path in root.rglob("*.py"):
        if "workflow" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(root)}: {n}" for n in names if n == "sarm.workflow" or n.startswith("sarm.workflow.")
            ]
    assert offenders == []
    script = "import sys, sarm.schema, sarm.variants, sarm.config; print(sorted({'torch', 'pandas', 'numpy', 'transformers', 'sae_lens', 'sarm.rewardbench', 'sarm.data'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
