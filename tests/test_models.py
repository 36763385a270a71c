import pytest
import torch
from transformers import AutoModelForCausalLM

from sarm import models
from sarm.errors import SarmError


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_truncated_forward_equals_full_models_hidden_state(tiny_model_dir, layer):
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(layer))
    truncated = models.load_truncated(tiny_model_dir, layer, torch.float32)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = full(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    assert len(truncated.layers) == layer  # later layers are never built
    torch.testing.assert_close(truncated(input_ids=ids).last_hidden_state, expected, rtol=0, atol=1e-5)


def test_last_layer_has_no_final_norm(tiny_model_dir):
    # hidden_states[N] of HF carries the final norm; the truncated model must not.
    ids = torch.arange(5)[None]
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    captured = {}
    full.model.layers[-1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    normed = full(input_ids=ids, output_hidden_states=True).hidden_states[4]
    out = models.load_truncated(tiny_model_dir, 4, torch.float32)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, captured["h"], rtol=0, atol=1e-5)
    assert not torch.allclose(out, normed, atol=1e-3)


@pytest.mark.parametrize("layer", [0, 5, -1])
def test_layer_outside_model_names_the_key(tiny_model_dir, layer):
    with pytest.raises(SarmError, match=rf"model.layer = {layer} is outside the model's layers \(valid: 1..4\)"):
        models.load_truncated(tiny_model_dir, layer, torch.float32)


def test_model_without_chat_template_is_refused(tiny_model_dir, tmp_path):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SarmError, match="has no chat template; give one in config key model.chat_template"):
        models.load_tokenizer(tmp_path)
    # ... and a template given in the config is used instead.
    assert models.load_tokenizer(tmp_path, chat_template="{{ messages[0]['content'] }}").chat_template


def test_fetch_model_from_local_folder_and_from_mirror(tiny_model_dir, tmp_path):
    out = models.fetch_model({"path": str(tiny_model_dir)}, tmp_path / "a")
    assert (out / "model.safetensors").exists() and (out / "sarm_source.json").exists()
    mirror = tmp_path / "mirror"
    (mirror / "org").mkdir(parents=True)
    (mirror / "org" / "tiny").symlink_to(tiny_model_dir)
    out = models.fetch_model({"hub_id": "org/tiny"}, tmp_path / "b", mirror=str(mirror))
    assert '"mirror"' in (out / "sarm_source.json").read_text()


def test_unreachable_model_names_hub_id_and_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SarmError) as err:
        models.fetch_model({"name": "x", "hub_id": "no-such-org/no-such-model"}, tmp_path / "m", mirror=str(tmp_path / "mirror"))
    message = str(err.value)
    assert "no-such-org/no-such-model" in message and str(tmp_path / "mirror" / "no-such-org/no-such-model") in message
    assert not (tmp_path / "m").exists()


def test_resolve_dtype():
    assert models.resolve_dtype("float32") is torch.float32
    assert models.resolve_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)
    with pytest.raises(SarmError, match="model.dtype"):
        models.resolve_dtype("fp8")
