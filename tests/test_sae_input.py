"""A pretrained public SAE reads its own hook point, raw, normalised by sae-lens as its config says."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig

from sarm import activations as A
from sarm import models
from sarm.errors import SarmError
from sarm.reward import fit_reward_model
from sarm.reward_model import sae_features
from sarm.sae import prepare_sae
from sarm.sae_input import pretrained_input, sae_input

LAYER = 2  # the tiny model's hidden_states[2]: the output of block 1 in TransformerLens' names
SPEC = {"name": "tiny", "layer": LAYER, "dtype": "float32", "max_length": 96}
SETTINGS = {"pretrained": None, "width": None, "k": None, "include_final_token": True}


def save_public_sae(folder, hook="blocks.1.hook_resid_post", d_in=64, normalize="none"):
    """A small ReLU SAE saved in sae-lens' format with a hook name in its config, as a public release ships it."""
    torch.manual_seed(0)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=96, normalize_activations=normalize)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = "tiny"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    sae.save_model(folder)
    return folder


def cfg_of(hook, normalize="none", **extra):
    return {"d_in": 64, "normalize_activations": normalize, "metadata": {"hook_name": hook}, **extra}


@pytest.mark.parametrize(
    "hook, index, standardize",
    [
        ("blocks.1.hook_resid_post", 2, False),
        ("blocks.2.hook_resid_pre", 2, False),
        ("layers.1", 2, False),
        ("hidden_states.2", 2, False),
        ("hidden_states.2.standardized", 2, True),  # this project's own SAEs
    ],
)
def test_hook_names_map_to_hidden_states(hook, index, standardize):
    states = sae_input(cfg_of(hook), LAYER)
    assert (states["hook_name"], states["hidden_states"], states["standardize"]) == (hook, index, standardize)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            cfg_of("blocks.2.hook_resid_post"),
            "config key sae.pretrained: the SAE's hook blocks.2.hook_resid_post reads hidden_states[3], but config key "
            "model.layer = 2 caches hidden_states[2]; set model.layer: 3",
        ),
        (
            cfg_of("blocks.1.hook_mlp_out"),
            "config key sae.pretrained: the SAE's hook blocks.1.hook_mlp_out is not a residual-stream state",
        ),
        (cfg_of("blocks.1.attn.hook_z"), "the SAE's hook blocks.1.attn.hook_z is not a residual-stream state"),
        (
            cfg_of("blocks.1.hook_resid_post", "expected_average_only_in"),
            "config key sae.pretrained: the SAE (hook blocks.1.hook_resid_post) expects normalize_activations = "
            "'expected_average_only_in'",
        ),
        (
            cfg_of("blocks.1.hook_resid_post", "covariance_whitening"),
            "expects normalize_activations = 'covariance_whitening', which sae-lens does not apply inside encode "
            "(config key model.layer = 2",
        ),
    ],
)
def test_a_mismatch_is_refused_in_one_line_naming_the_hook_and_the_layer(cfg, message):
    with pytest.raises(SarmError) as err:
        sae_input(cfg, LAYER)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "model.layer = 2" in str(err.value)


def test_the_registry_folds_its_norm_scaling_factor():
    """SAE.from_pretrained folds a release's recorded scale into the weights: then the SAE reads raw states."""
    assert (
        sae_input(cfg_of("blocks.1.hook_resid_post", "expected_average_only_in"), LAYER, folded=True)["normalize_activations"]
        == "none"
    )


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    return models.load_tokenizer(tiny_model_dir), models.load_truncated(tiny_model_dir, LAYER, torch.float32)


def raw_final_states(tiny_model_dir, tokenizer, pairs) -> torch.Tensor:
    """hidden_states[2] at each sequence's final token, from the whole model run by transformers itself."""
    from transformers import AutoModel

    full = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = []
    for seq in A.pair_sequences(pairs).itertuples():
        ids = torch.as_tensor(A.encode(tokenizer, seq.prompt, seq.response, SPEC["max_length"]).input_ids)[None]
        with torch.no_grad():
            rows.append(full(input_ids=ids, output_hidden_states=True).hidden_states[LAYER][0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_pipeline_features_are_the_sae_of_the_raw_hook_state(tiny_model_dir, hh_pairs, backbone, tmp_path, normalize):
    folder = save_public_sae(tmp_path / "sae", normalize=normalize)
    tokenizer, model = backbone
    states = pretrained_input({"path": str(folder)}, LAYER)
    assert states == {
        "hook_name": "blocks.1.hook_resid_post",
        "hidden_states": 2,
        "standardize": False,
        "normalize_activations": normalize,
        "d_in": 64,
    }
    pairs = hh_pairs.iloc[:3].reset_index(drop=True)
    meta = {"model": "tiny", "layer": LAYER, "dtype": "float32", "sae_input": states}
    A.cache_activations(model, tokenizer, pairs, tmp_path / "train", SPEC["max_length"], 4, meta=meta)
    cache = A.ActivationCache(tmp_path / "train")
    assert cache.meta["sae_input"] == states and cache.meta["standardize_eps"] is None

    sae, source, _ = prepare_sae({**SETTINGS, "pretrained": {"path": str(folder)}}, cache, "cpu", 0, {})
    assert source["input"]["hook_name"] == "blocks.1.hook_resid_post"
    raw = raw_final_states(tiny_model_dir, tokenizer, pairs)
    torch.testing.assert_close(cache.final(), raw, atol=1e-4, rtol=1e-4)
    expected = SAE.load_from_disk(folder).encode(raw)
    assert (expected > 0).any()
    torch.testing.assert_close(sae_features(sae, cache.final()), expected, atol=1e-4, rtol=1e-4)

    # the reward model records that it reads raw states, and scores text through the same path
    reward, _ = fit_reward_model(
        {"features": "sae"},
        cache,
        cache,
        tiny_model_dir,
        SPEC,
        {"epochs": 1, "lr": 0.01, "batch_size": 2, "weight_decay": 0.0},
        sae,
    )
    assert reward.config["standardize"] == {"per_token": False} and reward.config["sae_input"] == states
    reward.weight = torch.randn_like(reward.weight)
    from_text = reward.score([s.prompt for s in pairs.itertuples()], [s.chosen for s in pairs.itertuples()])
    torch.testing.assert_close(torch.as_tensor(from_text), reward.score_hidden(raw[0::2]), atol=1e-4, rtol=1e-4)


def test_a_wider_sae_is_refused_before_the_forward_pass(hh_pairs, backbone, tmp_path):
    folder = save_public_sae(tmp_path / "sae", d_in=32)
    tokenizer, model = backbone
    meta = {"layer": LAYER, "sae_input": pretrained_input({"path": str(folder)}, LAYER)}
    with pytest.raises(SarmError) as err:
        A.cache_activations(model, tokenizer, hh_pairs.iloc[:2], tmp_path / "train", 96, 4, meta=meta)
    assert str(err.value) == (
        "config key sae.pretrained: the SAE (hook blocks.1.hook_resid_post) reads 32-dim inputs, "
        "but the model's hidden_states[2] (config key model.layer = 2) are 64-dim"
    )
    assert not (tmp_path / "train" / A.META_FILE).exists()


def test_a_cache_of_standardised_states_is_refused_for_a_raw_sae(hh_pairs, backbone, tmp_path):
    """A cache written for this project's SAE (standardised) never feeds a public SAE that reads raw states."""
    folder = save_public_sae(tmp_path / "sae")
    tokenizer, model = backbone
    A.cache_activations(model, tokenizer, hh_pairs.iloc[:2], tmp_path / "train", 96, 4, meta={"layer": LAYER})
    with pytest.raises(
        SarmError,
        match=r"the SAE \(hook blocks.1.hook_resid_post\) reads raw hidden states, but the "
        r"activation cache holds standardised ones \(config key model.layer = 2\)",
    ):
        prepare_sae({**SETTINGS, "pretrained": {"path": str(folder)}}, A.ActivationCache(tmp_path / "train"), "cpu", 0, {})


def test_an_sae_without_a_hook_name_reads_this_projects_states(tmp_path):
    folder = save_public_sae(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].pop("hook_name")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert pretrained_input({"path": str(folder)}, LAYER)["standardize"] is True


def test_workflow_refuses_a_layer_mismatch_at_start(tiny_model_dir, shared_data, tmp_path):
    from test_workflow import snakemake, tiny_config

    config = tiny_config(tiny_model_dir, shared_data)
    config["sae"]["pretrained"] = {"path": str(save_public_sae(tmp_path / "sae", hook="blocks.2.hook_resid_post"))}
    result = snakemake(tmp_path / "w", config, "-n")
    assert result.returncode != 0
    assert (
        "config key sae.pretrained: the SAE's hook blocks.2.hook_resid_post reads hidden_states[3], but config key "
        "model.layer = 2 caches hidden_states[2]"
    ) in result.stdout + result.stderr
    assert not (tmp_path / "w" / "results").exists()


def test_a_registry_sae_whose_config_cannot_be_read_is_refused_naming_the_way_out(offline):
    with pytest.raises(SarmError) as err:
        pretrained_input({"release": "gpt2-small-res-jb", "sae_id": "blocks.1.hook_resid_pre"}, LAYER)
    assert str(err.value).startswith(
        "config key sae.pretrained: the config of SAE gpt2-small-res-jb/blocks.1.hook_resid_pre could not be read ("
    )
    assert str(err.value).endswith("save it as a folder and give {path: ...}") and "\n" not in str(err.value)
