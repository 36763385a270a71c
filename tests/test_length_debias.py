"""Length-debiased training (config key reward_models.<name>.length_debias) and the length-bias measurements."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from sarm import activations as A
from sarm.errors import SarmError
from sarm.length_bias import length_bias_table, length_correlation
from sarm.length_debias import LengthDebias, length_scale, pearson
from sarm.reward import train_head
from sarm.variants import spec_from_config


def synthetic(n: int, p_longer: float, seed: int):
    """Pairs whose feature 0 tracks the sequence's length and feature 1 its quality (the chosen one is better on
    average); the chosen response is the longer one in `p_longer` of the pairs. Rows 2i / 2i+1: chosen / rejected.
    Returns (features [2n, 8], token counts [2n])."""
    g = torch.Generator().manual_seed(seed)
    q_rejected = torch.randn(n, generator=g)
    q_chosen = q_rejected + torch.randn(n, generator=g) + 0.7
    l_rejected = 200 + 50 * torch.randn(n, generator=g)
    sign = torch.where(torch.rand(n, generator=g) < p_longer, 1.0, -1.0)
    l_chosen = l_rejected + sign * (20 + 40 * torch.rand(n, generator=g))
    lengths = torch.stack([l_chosen, l_rejected], 1).reshape(-1)
    quality = torch.stack([q_chosen, q_rejected], 1).reshape(-1)
    length_feature = (lengths - 200) / 50 + 0.1 * torch.randn(2 * n, generator=g)
    return torch.cat([length_feature[:, None], quality[:, None], torch.randn(2 * n, 6, generator=g)], 1), lengths


def differences(lengths: torch.Tensor) -> torch.Tensor:
    return lengths[0::2] - lengths[1::2]


def fit(method, train, lengths, val, epochs=20, **kwargs):
    diff = differences(lengths)
    debias = LengthDebias(method, 1.0, length_scale(diff)) if method else None
    weight, history = train_head(
        train, val, epochs=epochs, lr=0.05, batch_size=64, debias=debias, differences=diff if debias else None, **kwargs
    )
    return weight, history, debias


def test_poe_and_decorrelate_give_a_reward_less_tied_to_length_and_no_less_accurate():
    train, train_lengths = synthetic(2000, 0.85, seed=0)  # the chosen response is mostly the longer one
    val, _ = synthetic(400, 0.85, seed=1)
    test, test_lengths = synthetic(2000, 0.5, seed=2)  # length-balanced: length says nothing of the label
    results = {}
    for method in (None, "poe", "decorrelate"):
        weight, _, debias = fit(method, train, train_lengths, val)
        reward = test @ weight
        margin = reward[0::2] - reward[1::2]
        results[method] = (pearson(reward, test_lengths).item(), (margin > 0).float().mean().item(), debias)
    plain_corr, plain_accuracy, _ = results[None]
    assert plain_corr > 0.5  # plain BT learns the length shortcut
    for method in ("poe", "decorrelate"):
        corr, accuracy, _ = results[method]
        assert abs(corr) < 0.8 * plain_corr and accuracy >= plain_accuracy, (method, corr, accuracy, results[None])
    assert abs(results["decorrelate"][0]) < 0.5 * plain_corr
    # poe's length expert took up length: a positive beta (the chosen responses are longer), recorded
    record = results["poe"][2].record()
    assert record["length_debias"] == "poe" and record["length_beta"] > 0.1
    assert record["length_scale_tokens"] == pytest.approx(differences(train_lengths).double().std().item())


def test_a_poe_head_resumes_from_its_checkpoint_with_beta(tmp_path):
    train, lengths = synthetic(300, 0.85, seed=3)
    val, _ = synthetic(100, 0.85, seed=4)
    fit("poe", train, lengths, val, epochs=8, checkpoint_root=tmp_path)  # a run cut short after epoch 8...
    whole, whole_history, whole_debias = fit("poe", train, lengths, val)
    # ...resumed from its checkpoint (beta and its Adam state with it) ends as the uninterrupted run
    resumed, resumed_history, resumed_debias = fit("poe", train, lengths, val, checkpoint_root=tmp_path)
    assert torch.equal(resumed, whole) and resumed_history.equals(whole_history)
    assert "length_beta" in whole_history.columns
    assert resumed_debias.record() == whole_debias.record()


def test_pearson_of_a_constant_is_zero_with_a_finite_gradient():
    margin = torch.zeros(4, requires_grad=True)
    value = pearson(margin, torch.tensor([1.0, -2.0, 3.0, 0.5])).abs()
    value.backward()
    assert value.item() == 0 and torch.isfinite(margin.grad).all()


@pytest.mark.parametrize(
    "given, message",
    [
        ({"length_debias": "odin"}, r"^config key reward_models.x.length_debias: 'odin' is not one of null, poe, decorrelate$"),
        (
            {"length_debias": "decorrelate", "length_weight": -1},
            r"^config key reward_models.x.length_weight: -1 must be a number >= 0$",
        ),
        (
            {"length_debias": "poe", "length_weight": 2.0},
            r"^config key reward_models.x.length_weight: it weighs length_debias: decorrelate only \(here 'poe'\)$",
        ),
        (
            {"mode": "sparse_rm", "length_debias": True},
            r"^config key reward_models.x.length_debias: True is not one of null, poe, decorrelate$",
        ),
        (
            {"mode": "full_depth", "length_weight": "big"},
            r"^config key reward_models.x.length_weight: 'big' must be a number >= 0$",
        ),
    ],
)
def test_a_bad_length_debias_is_one_line_naming_the_key(given, message):
    with pytest.raises(SarmError, match=message):
        spec_from_config("x", given)


@pytest.mark.parametrize("mode", ["frozen", "sparse_rm", "finetune", "joint", "full_depth"])
def test_every_kind_takes_the_length_debias_keys(mode):
    spec = spec_from_config("x", {"mode": mode, "length_debias": "decorrelate", "length_weight": 0.5})
    assert (spec.length_debias, spec.length_weight) == ("decorrelate", 0.5)
    assert spec_from_config("x", {"mode": mode}).length_debias is None


def test_cached_heads_record_their_length_term(trained, tiny_model_dir):
    """The frozen head (poe) and SparseRM (decorrelate) on real caches: the saved model is the head alone, its
    training record names the length term; validation accuracy is the head's."""
    from sarm.sae import load_sae

    root = trained[0]
    train, val = A.ActivationCache(root / "train"), A.ActivationCache(root / "val")
    sae = load_sae(root / "rm" / "sae")
    model_spec = {"name": "tiny", "layer": 2, "dtype": "float32", "max_length": 96}
    settings = {"epochs": 3, "lr": 0.01, "batch_size": 4, "weight_decay": 0.0}
    head = spec_from_config("sarm", {"length_debias": "poe"})
    model, history = head.fit_cached(train, val, tiny_model_dir, model_spec, settings, sae)
    training = model.config["training"]
    assert training["length_debias"] == "poe" and isinstance(training["length_beta"], float)
    assert "length_weight" not in training and len(history) == 3 and "length_beta" in history.columns
    best = history.loc[training["selected_epoch"] - 1]
    assert training["length_beta"] == pytest.approx(best["length_beta"])  # beta as at the kept epoch
    assert model.weight.shape == (sae.cfg.d_sae,)
    sparse = spec_from_config("srm", {"mode": "sparse_rm", "m": 8, "mlp_hidden": 4, "length_debias": "decorrelate"})
    sparse_model, _ = sparse.fit_cached(train, val, tiny_model_dir, model_spec, settings, sae)
    assert sparse_model.config["training"]["length_debias"] == "decorrelate"
    assert sparse_model.config["training"]["length_weight"] == 1.0


def test_finetune_with_poe_trains_and_records_beta(tiny_model_dir, hh_pairs, tmp_path):
    from sarm.finetune import finetune_reward_model
    from sarm.reward_model import load

    settings = {
        "epochs": 1,
        "lr": 1e-3,
        "head_lr": 1e-1,
        "global_batch_size": 4,
        "per_device_batch_size": 2,
        "weight_decay": 0.0,
        "warmup_ratio": 0.0,
        "gradient_checkpointing": False,
        "dtype": "float32",
        "max_pairs": None,
        "gpus": 1,
    }
    model_spec = {"name": "tiny", "layer": 2, "dtype": "float32", "max_length": 512}  # lengths not truncated
    spec = {"features": "hidden", "mode": "finetune", "length_debias": "poe"}
    out, history = finetune_reward_model(
        spec, settings, tiny_model_dir, model_spec, hh_pairs.iloc[:8], hh_pairs.iloc[8:], tmp_path / "rm", None, "cpu"
    )
    training = json.loads((out / "reward_model.json").read_text())["training"]
    assert training["length_debias"] == "poe" and training["length_beta"] != 0.0
    assert training["length_scale_tokens"] > 1
    model = load(out)  # the head alone: it loads and scores
    assert np.isfinite(model.score(hh_pairs.prompt[:2].tolist(), hh_pairs.chosen[:2].tolist(), 2)).all()


def test_summary_length_correlation_of_a_real_scores_table(trained):
    from sarm.evaluate import score_cached
    from sarm.reward_model import load
    from sarm.rewardbench import length_baseline

    root, val_pairs, _ = trained
    scores = score_cached(load(root / "rm"), A.ActivationCache(root / "val"), val_pairs)
    corr = length_correlation(scores, val_pairs)
    rewards = np.concatenate([scores.score_chosen, scores.score_rejected])
    chars = np.concatenate([val_pairs.chosen.str.len(), val_pairs.rejected.str.len()])
    assert corr["responses"] == 2 * len(val_pairs) and corr["unit"] == "characters"
    assert corr["pearson"] == pytest.approx(stats.pearsonr(rewards, chars)[0])
    assert corr["spearman"] == pytest.approx(stats.spearmanr(rewards, chars)[0])
    margin = scores.score_chosen - scores.score_rejected
    assert corr["pair_pearson"] == pytest.approx(
        stats.pearsonr(margin, val_pairs.chosen.str.len() - val_pairs.rejected.str.len())[0]
    )
    baseline = length_correlation(length_baseline(val_pairs), val_pairs)
    assert baseline["pearson"] == pytest.approx(1) and baseline["pair_pearson"] == pytest.approx(1)


def test_a_completion_in_several_pairs_counts_once():
    pairs = pd.DataFrame(
        {"id": ["a", "b", "c"], "chosen": ["xx"] * 3, "rejected": ["y", "yyyy", "yyyyyyy"], "subset": "s", "category": "c"}
    )
    scores = pairs[["id", "subset", "category"]].assign(
        score_chosen=2.0, score_rejected=[1.0, 0.5, 0.0], group="g", chosen_index=0, rejected_index=[1, 2, 3]
    )
    corr = length_correlation(scores, pairs)
    assert corr["responses"] == 4  # the chosen completion once, three rejected ones
    assert corr["pearson"] == pytest.approx(stats.pearsonr([2.0, 1.0, 0.5, 0.0], [2, 1, 4, 7])[0])


def test_the_length_bias_table_sets_correlations_beside_accuracy_and_bon_length():
    def summary(accuracy, value):
        categories = [{"category": "a", "accuracy": 1.0}, {"category": "overall", "accuracy": accuracy}]
        return {
            "accuracy": 0.5,  # pair accuracy: not the tables' overall (the mean of the categories)
            "categories": categories,
            "length_correlation": {"pearson": value, "spearman": value, "pair_pearson": value},
        }

    summaries = {("sarm", "val"): summary(0.7, 0.2), ("length", "val"): summary(0.6, 1.0)}
    bon = pd.DataFrame(
        {
            "selector": ["sarm", "random", "longest", "oracle"],
            "win_rate": [20.0, 10, 15, 40],
            "mean_length": [900, 800, 2000, 1100],
        }
    )
    table = length_bias_table(summaries, bon)
    assert table[["model", "accuracy", "pearson", "bon_mean_length"]].values.tolist() == [
        ["sarm", 70.0, 0.2, 900],
        ["length", 60.0, 1.0, 2000],  # the length baseline picks the longest candidate
    ]
    assert "bon_mean_length" not in length_bias_table(summaries).columns
    with pytest.raises(SarmError, match="the val summary of old has no length_correlation"):
        length_bias_table({("old", "val"): {"accuracy": 0.5}})
