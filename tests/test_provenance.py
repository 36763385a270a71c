"""The portable CPU kernels (config key cpu_kernels): the same bits with and without AVX-512, which native kernels
do not give; and the record of what computed a result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sarm.provenance import AVX2_ONLY, ISA_CAPS, PORTABLE_CPU, describe, machine

CACHE_AND_HASH = """
import hashlib, sys, torch
from sarm import activations as A, models
from sarm.data import load_pairs
model_dir, data, out = sys.argv[1:]
pairs, _ = load_pairs("hh", {"path": data, "format": "hh_rlhf", "max_pairs": 6})
A.cache_activations(models.load_truncated(model_dir, 2, torch.float32), models.load_tokenizer(model_dir), pairs, out,
                    max_length=96, batch_size=4)
print(hashlib.sha256(A.ActivationCache(out).final().numpy().tobytes()).hexdigest())
"""


def cached_states_hash(tiny_model_dir: Path, shared_data: Path, folder: Path, env: dict) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in {*PORTABLE_CPU, *AVX2_ONLY}}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CACHE_AND_HASH,
            str(tiny_model_dir),
            str(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"),
            str(folder),
        ],
        env={**clean, **env, "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.skipif("avx512f" not in machine()["cpu_flags"], reason="without AVX-512 both settings run the same kernels")
def test_portable_kernels_give_the_same_bits_without_avx512(tiny_model_dir, shared_data, tmp_path):
    """On an AVX-512 CPU, portable kernels give the bits of the same run held to AVX2 (a CPU without AVX-512)."""
    portable = cached_states_hash(tiny_model_dir, shared_data, tmp_path / "a", PORTABLE_CPU)
    without_avx512 = cached_states_hash(tiny_model_dir, shared_data, tmp_path / "b", {**PORTABLE_CPU, **AVX2_ONLY})
    assert portable == without_avx512


def test_the_record_names_the_kernels_it_was_held_to(monkeypatch):
    for name in ISA_CAPS:  # whatever the shell set
        monkeypatch.delenv(name, raising=False)
    for name, value in PORTABLE_CPU.items():
        monkeypatch.setenv(name, value)
    found = machine()
    assert found["isa_caps"] == PORTABLE_CPU
    assert describe("float32", found).endswith("ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2)")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.delenv("MKL_CBWR")
    assert "isa_caps" not in machine()


@pytest.mark.parametrize("value", ["portable", "native"])
def test_the_workflow_pins_the_kernels_only_when_portable(value, tiny_model_dir, shared_data, tmp_path):
    """Every job inherits the kernels the config asks for (a cache records them), whatever the shell had."""
    import json

    from test_workflow import snakemake, tiny_config

    config = {**tiny_config(tiny_model_dir, shared_data), "cpu_kernels": value}
    env = {name: "" for name in PORTABLE_CPU}  # set but empty: as unset for torch and MKL
    result = snakemake(tmp_path, config, "results/activations/tiny-L2/val", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "results/activations/tiny-L2/val/meta.json").read_text())
    assert meta["machine"].get("isa_caps") == (PORTABLE_CPU if value == "portable" else None)
