"""The reward-model variant: typed specs from the config, the registry of kinds, and what a new kind takes."""

from __future__ import annotations

import dataclasses

import pytest

from sarm import cluster
from sarm.ablations import comparisons
from sarm.errors import SarmError
from sarm.tables import ablation_of
from sarm.variants import FrozenHead, kinds, register, spec_from_config, spec_from_dict, specs_from_config
from sarm.workflow import resources

ABLATIONS = {
    "sarm": {"features": "sae"},
    "dense": {"features": "hidden"},
    "sarm-random-sae": {"sae": "random"},
    "sarm-finetuned": {"mode": "finetune"},
    "dense-finetuned": {"mode": "finetune", "features": "hidden"},
    "sarm-joint": {"mode": "joint", "topk": False, "recon_weight": 0.5},
    "full-depth": {"mode": "full_depth"},
}
SHAPE = cluster.Shape(
    params_b=0.135, loaded_b=0.08, num_hidden_layers=30, hidden_size=576, source="SmolLM2-135M", num_attention_heads=9
)


def test_each_kind_answers_what_the_workflow_asks():
    specs = specs_from_config({"reward_models": ABLATIONS})
    answers = {
        name: (s.kind, s.trains_on_cache, s.own_backbone, s.scored_from_cache, s.feature_head, s.reads_sae, s.explainable)
        for name, s in specs.items()
    }
    assert answers == {
        "sarm": ("frozen", True, False, True, True, "sequence", True),
        "dense": ("frozen", True, False, True, True, None, False),
        "sarm-random-sae": ("frozen", True, False, True, True, "random", True),
        "sarm-finetuned": ("finetune", False, True, False, True, "sequence", True),
        "dense-finetuned": ("finetune", False, True, False, True, None, False),
        "sarm-joint": ("joint", False, True, False, True, "sequence", True),
        "full-depth": ("full_depth", False, True, False, False, None, False),
    }
    assert specs["sarm-joint"].as_dict() == {
        "features": "sae",
        "mode": "joint",
        "sae": "sequence",
        "topk": False,
        "length_debias": None,
        "length_weight": 1.0,
        "recon_weight": 0.5,
    }
    assert specs["dense"].as_dict() == {
        "features": "hidden",
        "mode": "frozen",
        "sae": None,
        "topk": None,
        "length_debias": None,
        "length_weight": 1.0,
    }
    # a rule's params give the same spec back; an older record's extra key (recon_weight on every mode) is dropped
    assert all(spec_from_dict(name, spec.as_dict()) == spec for name, spec in specs.items())
    older = {"features": "hidden", "mode": "finetune", "sae": None, "topk": None, "recon_weight": 1.0}
    assert spec_from_dict("dense-finetuned", older) == specs["dense-finetuned"]


@pytest.mark.parametrize(
    "given, message",
    [
        (
            {"mode": "nope"},
            r"^config key reward_models.x.mode: 'nope' is not a reward-model kind \(one of: (\w+, )*finetune, frozen, full_depth, joint",
        ),
        ({"features": "hidden", "topk": False}, r"^config key reward_models.x: sae and topk apply to features: sae only"),
        (
            {"mode": "joint", "features": "hidden"},
            r"^config key reward_models.x.mode: joint trains an SAE, so it needs features: sae$",
        ),
        ({"mode": "joint", "recon_weight": -1}, r"^config key reward_models.x.recon_weight: -1 must be a number >= 0$"),
        (
            {"mode": "full_depth", "sae": "token"},
            r"^config key reward_models.x: a full_depth model is a sequence classifier; give only mode \(and "
            r"length_debias, length_weight\)$",
        ),
        (
            {"recon_weight": 1.0},
            r"^config key reward_models.x: 'recon_weight' is not a key of mode frozen \(its keys: features, "
            r"length_debias, length_weight, mode, sae, topk\)$",
        ),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_key(given, message):
    with pytest.raises(SarmError, match=message):
        spec_from_config("x", given)


def test_the_cost_of_training_follows_the_kind(shared_data):
    from test_cluster import repo_config

    config = repo_config("config/paper/sarm-4b.yaml", shared_data) | {
        "resources_dir": "none",
        "device": "cuda",
        "reward_models": ABLATIONS,
    }
    config["finetune"] = {**config["finetune"], "gpus": 2, "max_pairs": None, "cpu_processes": 1, "zero3": False}
    specs = specs_from_config(config)
    frozen = resources.estimate("train_reward", config, SHAPE, rm=specs["sarm"])
    tuned = resources.estimate("finetune_reward", config, SHAPE, rm=specs["sarm-finetuned"])
    full = resources.estimate("finetune_reward", config, SHAPE, rm=specs["full-depth"])
    assert frozen["gpu"] == 0 and tuned["gpu"] == 2 and full["gpu"] == 2  # a cached head trains on the CPU
    assert full["gpu_mem_mb"] > tuned["gpu_mem_mb"]  # all 30 layers against layers 1..L
    # scored from the text (its own backbone) on a GPU; a cached head reads its cache on the CPU
    assert resources.estimate("evaluate", config, SHAPE, "val", specs["sarm-finetuned"])["gpu"] == 1
    assert resources.estimate("evaluate", config, SHAPE, "val", specs["sarm"])["gpu"] == 0
    # by name, from the config as given, the same request
    assert resources.estimate("train_reward", config, SHAPE, rm="sarm") == frozen


def test_a_new_kind_is_one_class_and_its_registration():
    """A kind registered from outside the package reaches the config, the workflow's questions, the costs, the
    ablation claims and the paper's tables with no other edit."""

    @register("frozen_n_epochs_example")
    @dataclasses.dataclass(frozen=True)
    class FrozenEpochsExample(FrozenHead):
        epochs: int = 1

        def fit_cached(self, train, val, model_dir, model_spec, settings, *args, **kwargs):
            return super().fit_cached(train, val, model_dir, model_spec, {**settings, "epochs": self.epochs}, *args, **kwargs)

    try:
        specs = specs_from_config(
            {
                "reward_models": {
                    "sarm": {},
                    "short": {"mode": "frozen_n_epochs_example", "epochs": 2},
                    "dense": {"features": "hidden"},
                }
            }
        )
        short = specs["short"]
        assert isinstance(short, FrozenEpochsExample) and short.epochs == 2 and short.trains_on_cache and short.scored_from_cache
        assert short.as_dict() == {
            "features": "sae",
            "mode": "frozen_n_epochs_example",
            "sae": "sequence",
            "topk": True,
            "length_debias": None,
            "length_weight": 1.0,
            "epochs": 2,
        }
        assert spec_from_dict("short", short.as_dict()) == short
        assert ablation_of(short) == "SARM"  # the paper's head, trained otherwise
        # claims compare models of one kind: the new kind is compared with its own kind only
        assert ("SARM head >= dense head on the same layer", "sarm", "dense") in comparisons(specs)
        assert not [c for c in comparisons(specs) if "short" in c]
        with pytest.raises(
            SarmError,
            match=r"'lr' is not a key of mode frozen_n_epochs_example \(its keys: epochs, features, length_debias, "
            r"length_weight, mode, sae, topk\)",
        ):
            spec_from_config("short", {"mode": "frozen_n_epochs_example", "lr": 1})
    finally:
        from sarm.variants import spec as registry

        registry._KINDS.pop("frozen_n_epochs_example")
    assert "frozen_n_epochs_example" not in kinds()


def test_a_kind_registered_twice_is_refused():
    with pytest.raises(ValueError, match="'frozen' is registered twice"):
        register("frozen")(type("Other", (FrozenHead,), {}))


def test_the_validated_config_gives_the_same_specs():
    """Snakemake's validation fills in the schema's defaults; the kinds own theirs, so the config after it gives the
    same specs (and a job sized by name, `estimate(..., rm="dense")`, sees the same model)."""
    import copy

    import yaml
    from snakemake.utils import validate
    from test_workflow import REPO

    config = yaml.safe_load((REPO / "config/config.yaml").read_text()) | {"reward_models": ABLATIONS}
    validated = copy.deepcopy(config)
    validate(validated, str(REPO / "workflow/schemas/config.schema.yaml"))
    assert specs_from_config(validated) == specs_from_config(config)
