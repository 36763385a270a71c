import math

import numpy as np
import pandas as pd
import pytest
import torch

from sarm import activations as A
from sarm.errors import SarmError
from sarm.evaluate import score_cached
from sarm.reward import RewardModel, bt_loss, train_head
from sarm.sae import train_sae


def test_bt_loss_by_hand():
    # equal rewards: -log sigmoid(0) = log 2; margin 2: log(1 + e^-2)
    assert bt_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    assert bt_loss(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])).item() == pytest.approx(
        (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    )


def test_head_learns_a_separable_preference_and_starts_at_zero():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(400, 20, generator=g)
    feats[0::2, 3] += 1.0  # chosen rows fire feature 3 more
    weight, history = train_head(feats[:320], feats[320:], epochs=20, lr=0.05, batch_size=32)
    assert history["val_accuracy"].iloc[-1] == 1.0
    assert weight.argmax().item() == 3
    _, one_step = train_head(feats[:320], feats[320:], epochs=1, lr=1e-9, batch_size=320)
    assert one_step["train_loss"].iloc[0] == pytest.approx(math.log(2), abs=1e-6)  # zero init: r = 0


def test_sae_width_must_match_head(tmp_path):
    sae = train_sae(lambda: [torch.randn(256, 8)], 8, 32, 2, 256, batch_size=64)
    with pytest.raises(SarmError, match="the SAE has 32 latents but the head has 31 weights"):
        RewardModel({"features": "sae"}, torch.zeros(31), sae)


def test_cached_features_and_raw_text_give_the_same_score(trained):
    root, val_pairs, _ = trained
    model = RewardModel.from_pretrained(root / "rm")
    cached = score_cached(model, A.ActivationCache(root / "val"), val_pairs)
    raw_chosen = model.score(list(val_pairs.prompt), list(val_pairs.chosen), batch_size=3)
    raw_rejected = model.score(list(val_pairs.prompt), list(val_pairs.rejected), batch_size=1)
    np.testing.assert_allclose(raw_chosen, cached.score_chosen, atol=1e-4, rtol=0)
    np.testing.assert_allclose(raw_rejected, cached.score_rejected, atol=1e-4, rtol=0)
    assert np.abs(cached.score_chosen).max() > 0  # not trivially zero


def test_reward_model_folder_rebuilds_the_model(trained):
    root, _, history = trained
    model = RewardModel.from_pretrained(root / "rm")
    base = model.config["base_model"]
    assert base["layer"] == 2 and base["dtype"] == "float32" and model.config["standardize"]["eps"] == 1e-6
    assert model.sae.cfg.d_sae == len(model.weight) == 256
    best = history.sort_values(["val_accuracy", "val_loss"], ascending=[False, True]).iloc[0]
    assert model.config["training"]["selected_epoch"] == best["epoch"]
    hidden = A.standardize(torch.randn(3, 64))
    contributions = model.contributions(model.features(hidden))
    assert (contributions != 0).sum(1).tolist() == [8, 8, 8]  # k = 8 active latents each
    torch.testing.assert_close(contributions.sum(1), model.score_hidden(hidden), atol=1e-5, rtol=0)


def test_stale_cache_is_refused(trained):
    root, val_pairs, _ = trained
    model = RewardModel.from_pretrained(root / "rm")
    with pytest.raises(SarmError, match="cached from other pairs"):
        score_cached(model, A.ActivationCache(root / "val"), val_pairs.iloc[::-1])


def test_cli_scores_like_the_package(trained, capsys):
    from sarm.cli import main

    root, val_pairs, _ = trained
    prompt, response = val_pairs.prompt[0][-1]["content"], val_pairs.chosen[0]
    main(["score", "--model", str(root / "rm"), "--prompt", prompt, "--response", response])
    printed = float(capsys.readouterr().out.split(":")[1].strip(" }\n"))
    expected = RewardModel.from_pretrained(root / "rm").score([prompt], [response])[0]
    assert printed == pytest.approx(expected, abs=1e-5)
