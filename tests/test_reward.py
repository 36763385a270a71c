import math

import numpy as np
import pytest
import torch

from sarm import activations as A
from sarm.errors import SarmError
from sarm.evaluate import score_cached
from sarm.reward import bt_loss, train_head
from sarm.reward_model import RewardModel
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
    sae = train_sae([torch.randn(256, 8)], 8, 32, 2, 256, batch_size=64)
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


# --- a reward-model folder never runs code, nor gives a NaN score ---

SHIPPED_CODE = """
import os
from pathlib import Path

from transformers import LlamaConfig, LlamaModel

Path(os.environ["SARM_TEST_MARKER"]).write_text("the folder's code ran")


class ShippedConfig(LlamaConfig):
    pass


class ShippedModel(LlamaModel):
    config_class = ShippedConfig
"""


def folder_with_shipped_code(trained, tiny_model_dir, tmp_path):
    """A copy of the trained model whose base model ships Python (auto_map) and whose reward_model.json asks
    for trust_remote_code."""
    import json
    import shutil

    root, _, _ = trained
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "shipped.py").write_text(SHIPPED_CODE)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "shipped.ShippedConfig", "AutoModel": "shipped.ShippedModel"}
    (base / "config.json").write_text(json.dumps(config))
    folder = tmp_path / "rm"
    shutil.copytree(root / "rm", folder)
    spec = json.loads((folder / "reward_model.json").read_text())
    spec["base_model"].update(path=str(base), trust_remote_code=True)
    (folder / "reward_model.json").write_text(json.dumps(spec))
    return folder


def run_cli(*args, marker):
    import os
    import subprocess
    import sys

    env = {**os.environ, "SARM_TEST_MARKER": str(marker), "HF_MODULES_CACHE": str(marker.parent / "modules")}
    return subprocess.run([sys.executable, "-m", "sarm.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_folder_cannot_make_sarm_score_run_its_code(trained, tiny_model_dir, tmp_path):
    """reward_model.json's trust_remote_code: true made `sarm score` import the Python inside the folder."""
    folder, marker = folder_with_shipped_code(trained, tiny_model_dir, tmp_path), tmp_path / "marker"
    args = ["score", "--model", str(folder), "--prompt", "Hi", "--response", "Hello."]
    refused = run_cli(*args, marker=marker)
    assert refused.returncode != 0 and not marker.exists()
    assert refused.stderr.strip().splitlines()[-1].startswith(f"sarm: error: {folder}: its base model runs its own Python code")
    assert "--trust-remote-code" in refused.stderr and "Traceback" not in refused.stderr
    allowed = run_cli(*args, "--trust-remote-code", marker=marker)  # the person running it allows it
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert marker.exists() and math.isfinite(float(allowed.stdout.split(":")[1].strip(" }\n")))


def test_loading_a_model_never_takes_trust_from_the_folder(trained, tiny_model_dir, tmp_path):
    from sarm.reward_model import load as load_reward_model

    folder = folder_with_shipped_code(trained, tiny_model_dir, tmp_path)
    for model in (RewardModel.from_pretrained(folder), load_reward_model(folder)):
        assert model.trust_remote_code is False
        with pytest.raises(SarmError, match="its base model runs its own Python code"):
            model.score(["Hi"], ["Hello."])


def test_a_head_with_nan_weights_is_refused_and_never_scores(trained, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    from sarm.cli import main

    root, val_pairs, _ = trained
    folder = tmp_path / "rm"
    shutil.copytree(root / "rm", folder)
    weight = RewardModel.from_pretrained(folder).weight.clone()
    weight[5] = float("nan")
    save_file({"weight": weight}, folder / "head.safetensors")
    with pytest.raises(SystemExit, match=f"^sarm: error: {folder / 'head.safetensors'}: non-finite weights"):
        main(["score", "--model", str(folder), "--prompt", "Hi", "--response", "Hello."])
    assert capsys.readouterr().out == ""  # no NaN printed
    (folder / "head.safetensors").write_bytes((root / "rm" / "head.safetensors").read_bytes()[:40])
    with pytest.raises(SarmError, match=f"^{folder / 'head.safetensors'}: corrupt or truncated .*re-run the rule that trained"):
        RewardModel.from_pretrained(folder)


def test_non_finite_scores_stop_evaluation_naming_the_cache(trained):
    """NaN scores were counted as wrong pairs: a wrong accuracy with exit 0."""
    root, val_pairs, _ = trained
    model = RewardModel.from_pretrained(root / "rm")
    model.weight[7] = float("inf")  # inf * 0 (a latent that does not fire) is NaN
    with pytest.raises(SarmError, match=rf"^{root / 'rm'}: 8 of 8 rewards from the cache {root / 'val'} are not finite"):
        score_cached(model, A.ActivationCache(root / "val"), val_pairs)


def test_a_folder_whose_base_model_is_gone_names_it(trained, tmp_path):
    import json
    import shutil

    root, _, _ = trained
    folder = tmp_path / "rm"
    shutil.copytree(root / "rm", folder)
    spec = json.loads((folder / "reward_model.json").read_text())
    spec["base_model"]["path"] = "/elsewhere/resources/models/tiny"  # written on another machine
    (folder / "reward_model.json").write_text(json.dumps(spec))
    with pytest.raises(SarmError, match=r"base model /elsewhere/resources/models/tiny does not exist \(was the folder moved"):
        RewardModel.from_pretrained(folder).score(["Hi"], ["Hello."])
