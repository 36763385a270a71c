"""Fetch a base LM into a plain Hugging Face folder, and load it truncated at layer L.

A model comes from, in order: a local folder (`path`), the offline mirror (`<mirror>/<hub_id>`, a folder
laid out like the hub repo), the hub itself (`hub_id`), or a GGUF file shipped inside a Python package
(`gguf`: the embedded default's offline source). Whatever the source, the result is one plain
safetensors folder, so later rules load it in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from sarm.errors import SarmError
from sarm.provenance import machine

log = logging.getLogger(__name__)

SOURCE_FILE = "sarm_source.json"
# Files worth taking from a hub snapshot: weights in safetensors only (never pickles), configs, tokenizer.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """`auto` is bf16 where the device computes it natively (CUDA bf16, or a CPU with AVX512-BF16/AMX)."""
    if name != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
        except KeyError:
            raise SarmError(f"config key model.dtype: unknown dtype {name!r} (auto, float32, bfloat16, float16)") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    given = re.fullmatch(r"cpu|cuda(?::(\d+))?", name or "")
    if given is None:
        raise SarmError(f"config key device: {name!r} is not a device (auto, cpu, cuda or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SarmError(f"config key device: {name!r} asked for, but torch sees no CUDA device on this machine")
    if given.group(1) is not None and int(given.group(1)) >= torch.cuda.device_count():
        raise SarmError(f"config key device: {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return name


def fetch_model(spec: dict, out_dir: str | Path, mirror: str | None = None) -> Path:
    """Materialise the model named by `spec` as a plain HF folder at `out_dir`; return the folder."""
    out_dir = Path(out_dir)
    tried = []
    trust = bool(spec.get("trust_remote_code", False))
    if spec.get("path"):
        src = Path(spec["path"])
        if not (src / "config.json").exists():
            raise SarmError(f"config key model.path: {src} is not a model folder (no config.json)")
        _copy_folder(src, out_dir)
        return _record(out_dir, {"source": "path", "path": str(src.resolve())})
    hub_id = spec.get("hub_id")
    if hub_id and mirror:
        src = Path(mirror) / hub_id
        if (src / "config.json").exists():
            _copy_folder(src, out_dir)
            return _record(out_dir, {"source": "mirror", "path": str(src.resolve()), "hub_id": hub_id})
        tried.append(f"mirror {src} (no config.json)")
    elif hub_id:
        tried.append("no mirror configured (config key hub.mirror)")
    if hub_id:
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(hub_id, revision=spec.get("revision"), local_dir=out_dir, allow_patterns=HUB_PATTERNS)
            if not any(out_dir.glob("*.safetensors")):
                raise SarmError(f"hub repo {hub_id} has no safetensors weights; pickled weights are not loaded")
            return _record(out_dir, {"source": "hub", "hub_id": hub_id, "revision": spec.get("revision")})
        except SarmError:
            raise
        except Exception as err:  # network, auth, missing repo: all say the same thing to the user
            tried.append(f"hub {hub_id} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            shutil.rmtree(out_dir, ignore_errors=True)
    if spec.get("gguf"):
        gguf_path = _find_gguf(spec["gguf"])
        if gguf_path is not None:
            _convert_gguf(gguf_path, out_dir, trust)
            return _record(out_dir, {"source": "gguf", "gguf": str(gguf_path), "hub_id": hub_id})
        tried.append(f"gguf {spec['gguf']} (not installed)")
    raise SarmError(f"model {spec.get('name', hub_id)!r} could not be fetched; tried: " + "; ".join(tried))


def _find_gguf(gguf: dict) -> Path | None:
    if gguf.get("path"):
        path = Path(gguf["path"])
        return path if path.exists() else None
    found = importlib.util.find_spec(gguf["package"])
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / gguf["file"]
    return path if path.exists() else None


def _convert_gguf(gguf_path: Path, out_dir: Path, trust_remote_code: bool) -> None:
    """Dequantise a GGUF checkpoint once into fp32 safetensors (transformers reads GGUF via `gguf_file=`)."""
    kwargs = dict(gguf_file=gguf_path.name, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The weights are dequantised already; drop the GGUF quantiser so transformers will serialise them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _copy_folder(src: Path, out_dir: Path) -> None:
    if any(src.glob("*.bin")) and not any(src.glob("*.safetensors")):
        raise SarmError(f"{src} holds only pickled (.bin) weights; convert them to safetensors first")
    shutil.copytree(src, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", ".git"))


def _record(out_dir: Path, source: dict) -> Path:
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    log.info("model ready at %s (%s)", out_dir, source["source"])
    return out_dir


def load_tokenizer(path: str | Path, chat_template: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer with a chat template (the config may supply one) and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise SarmError(
            f"model at {path} has no chat template; give one in config key model.chat_template "
            "(a Jinja string) or use an instruct model"
        )
    if not tokenizer.is_fast:
        raise SarmError(f"model at {path}: a fast tokenizer is required (character offsets locate sentence ends)")
    if tokenizer.pad_token_id is None:
        # Padding sits right of every sequence under an attention mask, so its id never reaches a result.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise SarmError(f"model at {path}: the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def num_layers(path: str | Path, trust_remote_code: bool = False) -> int:
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers


def check_layer(layer: int, n_layers: int) -> None:
    if not 1 <= layer <= n_layers:
        raise SarmError(f"config key model.layer = {layer} is outside the model's layers (valid: 1..{n_layers})")


def load_truncated(
    path: str | Path, layer: int, dtype: torch.dtype, device: str = "cpu", trust_remote_code: bool = False
) -> torch.nn.Module:
    """The base transformer with only decoder layers 1..L built and loaded, and no final norm.

    Its `last_hidden_state` equals the full model's `hidden_states[L]`; later layers and the LM head are
    never instantiated, so memory and compute scale with L, not with the model's depth.
    """
    check_layer(layer, num_layers(path, trust_remote_code))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config.num_hidden_layers = layer
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layer]
    config.use_cache = False
    model = AutoModel.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            setattr(model, name, torch.nn.Identity())
            break
    else:
        raise SarmError(f"model at {path}: no final norm found among {FINAL_NORM_NAMES}; architecture unsupported")
    return model.to(device).eval().requires_grad_(False)


def load_backbone(spec: dict, path: str | Path, device: str = "auto"):
    """Tokenizer and truncated model for a config's `model:` section, with the device and the metadata
    that cached activations record: (tokenizer, model, device, meta)."""
    device = resolve_device(device)
    dtype = resolve_dtype(spec["dtype"], device)
    tokenizer = load_tokenizer(path, spec.get("chat_template"), spec.get("trust_remote_code", False))
    model = load_truncated(path, spec["layer"], dtype, device, spec.get("trust_remote_code", False))
    meta = {
        "model": spec["name"],
        "layer": spec["layer"],
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "machine": machine(),
    }
    if spec.get("sae_input"):  # a pretrained SAE's hook and normalisation (sarm.sae_input): what the caches hold
        meta["sae_input"] = spec["sae_input"]
    return tokenizer, model, device, meta
