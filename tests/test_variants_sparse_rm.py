"""`mode: sparse_rm` (SparseRM, arXiv 2511.07896): latent selection, the MLP's training, its saved format, its text
path, its config checks and its place in the workflow, on the tiny model and real HH-RLHF pairs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sarm import activations as A
from sarm.ablations import comparisons
from sarm.config import explain_reward_model
from sarm.errors import SarmError
from sarm.evaluate import score_cached
from sarm.reward_model import ProjectionRewardModel, load, load_feature_head, set_topk
from sarm.sae import load_sae
from sarm.tables import ablation_of
from sarm.variants import SparseRM, spec_from_config, spec_from_dict, specs_from_config
from sarm.variants.sparse_rm import train_mlp

MODEL_SPEC = {"name": "tiny", "layer": 2, "dtype": "float32", "max_length": 96}
SETTINGS = {"epochs": 30, "lr": 0.01, "batch_size": 4, "weight_decay": 0.0}
HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]


@pytest.fixture(scope="module")
def fitted(trained, tiny_model_dir, tmp_path_factory):
    """A SparseRM (m = 8) fitted on the tiny SARM fixture's caches and SAE, saved to <tmp>/srm."""
    root = trained[0]
    sae = load_sae(root / "rm" / "sae")
    train, val = A.ActivationCache(root / "train"), A.ActivationCache(root / "val")
    spec = spec_from_config("srm", {"mode": "sparse_rm", "m": 8, "mlp_hidden": 16})
    model, history = spec.fit_cached(train, val, tiny_model_dir, MODEL_SPEC, SETTINGS, sae, seed=0)
    folder = model.save_pretrained(tmp_path_factory.mktemp("sparse-rm") / "srm")
    return model, history, folder, sae, train, val


def test_the_selected_latents_are_the_top_m_by_mean_difference(fitted, trained, tiny_model_dir):
    model, _, _, sae, train, val = fitted
    set_topk(sae, True)
    with torch.no_grad():
        z = sae.encode(train.final()).float().numpy()
    difference = z[0::2].mean(0) - z[1::2].mean(0)  # chosen rows 2i, rejected rows 2i+1
    expected = np.argsort(-np.abs(difference), kind="stable")[:8]
    head = model.config["sparse_rm"]
    assert head["latents"] == expected.tolist()
    np.testing.assert_allclose(head["mean_difference"], difference[expected], atol=1e-5)
    rest = np.delete(np.abs(difference), expected)
    assert np.abs(difference[expected]).min() >= rest.max() > 0  # strictly ranked on this data, not by ties
    # the directions are the selected decoder rows at unit norm
    decoder = sae.W_dec.detach()[expected]
    torch.testing.assert_close(model.directions, decoder / decoder.norm(dim=1, keepdim=True))
    # `ranking: signed` keeps the chosen-leaning latents only
    signed = spec_from_config("srm", {"mode": "sparse_rm", "m": 8, "ranking": "signed"})
    signed_model, _ = signed.fit_cached(train, val, tiny_model_dir, MODEL_SPEC, {**SETTINGS, "epochs": 1}, sae)
    assert signed_model.config["sparse_rm"]["latents"] == np.argsort(-difference, kind="stable")[:8].tolist()


def test_the_mlp_learns_a_separable_preference():
    g = torch.Generator().manual_seed(0)
    m, d = 12, 24
    projections = torch.rand(400, m, generator=g)
    projections[0::2, 3] += 2.0  # chosen responses lie further along direction 3
    config = {"hidden_size": d, "sparse_rm": {"latents": list(range(m)), "mlp_hidden": 16}}
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(m, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1, bias=False))
    torch.nn.init.zeros_(mlp[2].weight)
    tensors = {
        "directions": torch.eye(m, d),
        "proj_mean": projections.mean(0),
        "proj_std": projections.std(0),
        **{f"mlp.{k}": v for k, v in mlp.state_dict().items()},
    }
    model = ProjectionRewardModel(config, tensors)
    history = train_mlp(model, projections[:320], projections[320:], {**SETTINGS, "epochs": 20, "batch_size": 32}, 1.0)
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["val_accuracy"].max() == 1.0
    assert history["train_loss"].iloc[-1] < 0.2 < history["train_loss"].iloc[0]
    hidden = torch.cat([projections[320:], torch.zeros(80, d - m)], 1)  # states whose projections are the rows
    rewards = model.score_hidden(hidden)
    assert (rewards[0::2] > rewards[1::2]).float().mean() == history.set_index("epoch").val_accuracy.max()


def test_training_on_the_real_pairs_fits_them_and_keeps_the_best_epoch(fitted):
    model, history, *_ = fitted
    assert list(history.columns) == HISTORY_COLUMNS and len(history) == SETTINGS["epochs"]
    assert history["train_loss"].iloc[0] > history["train_loss"].iloc[-1]
    assert history["train_accuracy"].iloc[-1] > 0.5  # better than chance on 8 real pairs
    best = history.sort_values(["val_accuracy", "val_loss"], ascending=[False, True], kind="stable").iloc[0]
    assert model.config["training"]["selected_epoch"] == best["epoch"]
    assert model.config["training"]["val_accuracy"] == pytest.approx(best["val_accuracy"])


def test_the_saved_model_round_trips_and_is_no_linear_head(fitted):
    model, _, folder, _, _, val = fitted
    saved = json.loads((folder / "reward_model.json").read_text())
    assert saved["format"] == "sarm-sparse-rm" and not (folder / "sae").exists()  # the m directions suffice
    loaded = load(folder)
    assert isinstance(loaded, ProjectionRewardModel) and loaded.config == model.config
    hidden = val.final()
    torch.testing.assert_close(loaded.score_hidden(hidden), model.score_hidden(hidden), atol=0, rtol=0)
    assert loaded.score_hidden(hidden).abs().max() > 0
    with pytest.raises(SarmError, match=r"a SparseRM's reward is an MLP over projections, not a sum over features"):
        load_feature_head(folder)
    with pytest.raises(SarmError, match="not a sum of per-feature contributions"):
        loaded.contributions(loaded.features(hidden))


def test_the_text_path_scores_as_the_cached_path(fitted, trained):
    _, _, folder, *_ = fitted
    _, val_pairs, _ = trained
    model = load(folder)
    cached = score_cached(model, A.ActivationCache(trained[0] / "val"), val_pairs)
    chosen = model.score(list(val_pairs.prompt), list(val_pairs.chosen), batch_size=3)
    rejected = model.score(list(val_pairs.prompt), list(val_pairs.rejected), batch_size=1)
    np.testing.assert_allclose(chosen, cached.score_chosen, atol=1e-4, rtol=0)
    np.testing.assert_allclose(rejected, cached.score_rejected, atol=1e-4, rtol=0)


def test_the_command_line_scores_it_as_the_package_does(fitted, trained, capsys):
    from sarm.cli import main

    _, _, folder, *_ = fitted
    _, val_pairs, _ = trained
    prompt, response = val_pairs.prompt.iloc[0], val_pairs.chosen.iloc[0]
    assert isinstance(prompt, list)  # messages: the command line takes the last user turn as a string
    text = prompt[-1]["content"]
    main(["score", "--model", str(folder), "--prompt", text, "--response", response])
    printed = json.loads(capsys.readouterr().out)["reward"]
    assert printed == pytest.approx(float(load(folder).score([text], [response])[0]), abs=1e-6)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"m": 0}, r"^config key reward_models.x.m: 0 must be an integer >= 1$"),
        ({"m": 2.5}, r"^config key reward_models.x.m: 2.5 must be an integer >= 1$"),
        ({"features": "hidden"}, r"^config key reward_models.x.features: sparse_rm projects on SAE decoder directions"),
        ({"mlp_hidden": -1}, r"^config key reward_models.x.mlp_hidden: -1 must be an integer >= 0$"),
        ({"margin": 0}, r"^config key reward_models.x.margin: 0 must be a number > 0$"),
        ({"ranking": "up"}, r"^config key reward_models.x.ranking: 'up' is not one of absolute, signed$"),
        (
            {"lr": 1},
            r"^config key reward_models.x: 'lr' is not a key of mode sparse_rm \(its keys: features, length_debias, "
            r"length_weight, m, margin",
        ),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_key(given, message):
    with pytest.raises(SarmError, match=message) as err:
        spec_from_config("x", {"mode": "sparse_rm", **given})
    assert "\n" not in str(err.value)


def test_m_wider_than_the_sae_is_one_line_naming_the_key(fitted, tiny_model_dir):
    *_, sae, train, val = fitted
    spec = spec_from_config("x", {"mode": "sparse_rm", "m": 257})
    with pytest.raises(SarmError, match=r"^config key reward_models.x.m: 257 is more than the SAE's 256 latents$"):
        spec.fit_cached(train, val, tiny_model_dir, MODEL_SPEC, SETTINGS, sae)


def test_the_kind_answers_what_the_workflow_asks(shared_data):
    specs = specs_from_config(
        {
            "reward_models": {
                "sarm": {},
                "dense": {"features": "hidden"},
                "srm": {"mode": "sparse_rm"},
                "bt": {"mode": "full_depth"},
            }
        }
    )
    srm = specs["srm"]
    assert isinstance(srm, SparseRM) and (srm.m, srm.mlp_hidden, srm.margin, srm.ranking) == (128, 64, 1.0, "absolute")
    answers = (srm.trains_on_cache, srm.own_backbone, srm.scored_from_cache, srm.feature_head, srm.reads_sae)
    assert answers == (True, False, True, True, "sequence")
    assert not srm.linear_head and not srm.explainable and not srm.paper_head and ablation_of(srm) is None
    assert specs["sarm"].linear_head and specs["sarm"].explainable
    assert spec_from_dict("srm", srm.as_dict()) == srm
    assert not [c for c in comparisons(specs) if "srm" in c]  # the ablation claims are about linear heads
    assert explain_reward_model({}, specs) == "sarm"
    with pytest.raises(SarmError, match=r"^config key explain.reward_model: 'srm' \(mode sparse_rm\) has no linear head"):
        explain_reward_model({"explain": {"reward_model": "srm"}}, specs)
    # its jobs are sized like the frozen head's: on the CPU
    from test_cluster import repo_config
    from test_variants import SHAPE

    from sarm.workflow import resources

    config = repo_config("config/paper/sarm-4b.yaml", shared_data) | {"resources_dir": "none", "device": "cuda"}
    config["reward_models"] = {"srm": {"mode": "sparse_rm"}}
    assert resources.estimate("train_reward", config, SHAPE, rm="srm")["gpu"] == 0
    assert resources.estimate("evaluate", config, SHAPE, "val", specs_from_config(config)["srm"])["gpu"] == 0


def _planned(output: str) -> list[tuple[str, dict, str]]:
    """(rule, wildcards, input) of every job a Snakemake dry run prints."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        head = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if head:
            fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
            wildcards = dict(kv.split("=", 1) for kv in fields["wildcards"].split(", ")) if "wildcards" in fields else {}
            jobs.append((head.group(1), wildcards, fields.get("input", "")))
    return jobs


def test_the_workflow_trains_evaluates_and_best_of_n_scores_it_but_never_explains_or_audits_it(
    tiny_model_dir, shared_data, tmp_path
):
    from test_workflow import snakemake, tiny_config

    config = tiny_config(tiny_model_dir, shared_data)
    config["reward_models"] = {"sarm": {}, "dense": {"features": "hidden"}, "sparse-rm": {"mode": "sparse_rm", "m": 8}}
    config["rl"] = {"prompts": {"mt_bench": str(shared_data / "prompts/mt_bench/question.jsonl")}, "steps": 2}
    result = snakemake(tmp_path / "all", config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _planned(result.stdout)
    assert [w for rule, w, _ in jobs if rule == "train_reward" and w["rm"] == "sparse-rm"]
    assert not [w for rule, w, _ in jobs if rule == "finetune_reward"]
    evaluated = {w["table"] for rule, w, _ in jobs if rule == "evaluate" and w["rm"] == "sparse-rm"}
    assert evaluated == {"val", "rb-like"}
    (bon,) = [inputs for rule, _, inputs in jobs if rule == "bon_scores"]
    assert "results/reward/sparse-rm" in bon and "results/reward/sarm" in bon
    # its folder is read by its evaluation and best-of-N only: no explain job (the default sarm's are planned)
    assert {rule for rule, _, inputs in jobs if "results/reward/sparse-rm" in inputs} == {"evaluate", "bon_scores"}
    assert "results/explain/sarm" in result.stdout
    assert "explain/sparse-rm" not in result.stdout and "shift/sparse-rm" not in result.stdout
    rl = snakemake(tmp_path / "rl", config, "-n", "rl")
    assert rl.returncode == 0, rl.stderr[-3000:]
    (judges,) = [inputs for rule, _, inputs in _planned(rl.stdout) if rule == "rl_evaluate"]
    assert "results/reward/sarm" in judges and "results/reward/dense" in judges and "sparse-rm" not in judges


def test_a_damaged_folder_is_one_line_naming_the_file(fitted, tmp_path):
    import shutil

    from safetensors.torch import save_file

    model, _, folder, *_ = fitted
    copy = tmp_path / "srm"
    shutil.copytree(folder, copy)
    save_file({k: v for k, v in model.tensors().items() if k != "proj_std"}, copy / "head.safetensors")
    with pytest.raises(SarmError, match=rf"^{copy / 'head.safetensors'}: corrupt or truncated .*'proj_std'.*re-run the rule"):
        load(copy)
    shutil.copy(folder / "head.safetensors", copy / "head.safetensors")
    config = json.loads((copy / "reward_model.json").read_text())
    config["sparse_rm"]["mlp_hidden"] = 3
    (copy / "reward_model.json").write_text(json.dumps(config))
    with pytest.raises(SarmError, match=r"^SparseRM: its MLP weights do not fit mlp_hidden = 3 over 8 projections"):
        load(copy)


def test_the_server_scores_it_and_refuses_attributions(fitted, trained):
    from test_serve import post, start

    from sarm.reward_model import load_base_head

    _, _, folder, *_ = fitted
    _, val_pairs, _ = trained
    model = load_base_head(folder)
    server, url = start(model, max_batch=4, max_wait_ms=2)
    try:
        prompts, responses = list(val_pairs.prompt), list(val_pairs.chosen)
        status, out = post(url, {"prompts": prompts, "responses": responses, "token_rewards": True})
        assert status == 200
        np.testing.assert_allclose(out["rewards"], model.score(prompts, responses), atol=1e-5, rtol=0)
        assert [t["rewards"][-1] for t in out["token_rewards"]] == pytest.approx(out["rewards"], abs=1e-4)
        status, out = post(url, {"prompts": prompts[:1], "responses": responses[:1], "return_attributions": 3})
        assert status == 400 and "no sum of per-feature contributions" in out["error"]
    finally:
        server.shutdown()
        server.server_close()
        server.service.close()
