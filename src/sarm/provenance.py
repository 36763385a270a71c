"""What a run was made with: package versions, data file checksums and the model's source."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path

PACKAGES = ("sarm", "torch", "transformers", "sae-lens", "datasets", "snakemake", "numpy", "pandas")


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# the CPU instructions that decide `model.dtype: auto` (native bf16) and the speed of float32 / int8 kernels
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve")
# The libraries' instruction-set settings, recorded with every result when set
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
# Config key cpu_kernels: portable. ATen's vectorised kernels (norms, softmax, reductions) and MKL's GEMMs (its
# conditional numerical reproducibility) on their AVX2 code paths: the same bits on every x86-64 CPU, with or
# without AVX-512. Native kernels differ in the last bits (SmolLM2-135M's cached states by 1e-5), and the SAE's
# training amplifies that: which latents TopK keeps changes, and SARM accuracies move by 1-3 points.
PORTABLE_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
# This machine computing as a CPU without AVX-512 (and so without native bf16) would: tests and benchmarks
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def machine() -> dict:
    """The processor a step ran on: CPU model, the flags of CPU_FLAGS it has, its logical CPUs, the GPU if any, and
    the instruction-set caps (ISA_CAPS) the libraries were given, if any."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    found = {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "cpus": os.cpu_count(),
    }
    caps = {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}
    if caps:
        found["isa_caps"] = caps
    try:
        import torch

        if torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return found


def describe(dtype: str | None, found: dict | None) -> str:
    """One line for a table's note: `hidden states in bfloat16 on <CPU> (avx512_bf16, ...)`."""
    if not found:
        return f"hidden states in {dtype}" if dtype else ""
    where = found.get("gpu") or found.get("cpu")
    caps = "; " + ", ".join(f"{k}={v}" for k, v in found["isa_caps"].items()) if found.get("isa_caps") else ""
    flags = "" if found.get("gpu") else f" ({', '.join(found.get('cpu_flags') or []) or 'no listed flags'}{caps})"
    return f"hidden states in {dtype} on {where}{flags}"


CACHE_META_FILE = "meta.json"  # what an activation cache records (sarm.activations writes it)
CACHE_FORMAT = 2  # what its shards hold (2: each sequence's prompt state too); the caching rules re-run when it changes


def computed_with(model, cache=None, device: str = "cpu") -> dict:
    """The dtype and the processor the hidden states were computed with: those the cache recorded when it was
    written (a frozen backbone), or this process's when a tuned model scores from text."""
    if cache is not None:
        return {"dtype": cache.meta.get("dtype"), "machine": cache.meta.get("machine")}
    from sarm.models import resolve_device, resolve_dtype

    base = model.config["base_model"]
    dtype = resolve_dtype(base.get("dtype", "float32"), resolve_device(device))
    return {"dtype": str(dtype).removeprefix("torch."), "machine": machine()}


def computed_with_note(summaries) -> str:
    """One note for a table built from `summaries`: the dtypes and processors their hidden states came from."""
    lines = [describe(s["computed_with"]["dtype"], s["computed_with"]["machine"]) for s in summaries if s.get("computed_with")]
    lines = list(dict.fromkeys(line for line in lines if line))
    return ("Computed with: " + "; ".join(lines) + ".") if lines else ""


def caches_note(folders) -> str:
    """`computed_with_note` for a table built from activation caches: what each cache recorded when it was written
    (its `meta.json` only: a table job reads no shard and needs no torch)."""
    from sarm.errors import SarmError

    notes = []
    for folder in folders:
        meta_file = Path(folder) / CACHE_META_FILE
        if not meta_file.exists():
            raise SarmError(f"{folder} is not a finished activation cache (no {CACHE_META_FILE}); re-run its rule")
        meta = json.loads(meta_file.read_text())
        notes.append({"computed_with": {"dtype": meta.get("dtype"), "machine": meta.get("machine")}})
    return computed_with_note(notes)


def collect(config: dict, model_dir: str | Path) -> dict:
    """Versions, the sha256 of every local data file and model weight file, and the model's source."""
    model_dir = Path(model_dir)
    source = model_dir / "sarm_source.json"
    return {
        "versions": versions(),
        "machine": machine(),
        "data": {
            name: {"path": spec["path"], "sha256": sha256(spec["path"])}
            if "path" in spec
            else {"hub": spec["hub"], "revision": spec.get("revision")}
            for name, spec in config["datasets"].items()
        },
        "model": {
            "source": json.loads(source.read_text()) if source.exists() else None,
            "weights_sha256": {p.name: sha256(p) for p in sorted(model_dir.glob("*.safetensors"))},
        },
        "config": config,
    }
