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


def machine() -> dict:
    """The processor a step ran on: CPU model, the flags of CPU_FLAGS it has, its logical CPUs, and the GPU if any."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    found = {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "cpus": os.cpu_count(),
    }
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
    flags = "" if found.get("gpu") else f" ({', '.join(found.get('cpu_flags') or []) or 'no listed flags'})"
    return f"hidden states in {dtype} on {where}{flags}"


def collect(config: dict, model_dir: str | Path) -> dict:
    """Versions, the sha256 of every local data file and model weight file, and the model's source."""
    model_dir = Path(model_dir)
    source = model_dir / "sarm_source.json"
    return {
        "versions": versions(),
        "machine": machine(),
        "data": {
            name: {"path": spec["path"], "sha256": sha256(spec["path"])} if "path" in spec else {"hub": spec["hub"], "revision": spec.get("revision")}
            for name, spec in config["datasets"].items()
        },
        "model": {
            "source": json.loads(source.read_text()) if source.exists() else None,
            "weights_sha256": {p.name: sha256(p) for p in sorted(model_dir.glob("*.safetensors"))},
        },
        "config": config,
    }
