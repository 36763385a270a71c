"""What a run was made with: package versions, data file checksums and the model's source."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
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


def collect(config: dict, model_dir: str | Path) -> dict:
    """Versions, the sha256 of every local data file and model weight file, and the model's source."""
    model_dir = Path(model_dir)
    source = model_dir / "sarm_source.json"
    return {
        "versions": versions(),
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
