"""The caching forward's CPU options side by side (issue 17): each option's tokens/s and how far its hidden states
and the default SARM's preferences move from plain float32.

    python benchmarks/cpu_options.py [--n-pairs 96] [--out options.md]     # or stage_benchmark.py --cpu-options

Every option runs in a fresh process (its own threads, kernels and instruction-set caps) on the same pairs,
through the workflow's own caching forward (`sarm.activations`), after one warm-up batch:
- the caching before issue 17 (one sequence a row, batch 16, two torch threads) and each step from it to the
  workflow's: prompts shared in packed rows, two worker threads of one torch thread each, batch 8, the portable
  kernels (config key cpu_kernels) and the same held to AVX2 (a CPU without AVX-512);
- batch 32, eager attention against SDPA, one thread, two one-thread jobs at once (their tokens/s added up);
- bfloat16 where the CPU computes it natively (AVX512-BF16 / AMX) and emulated (oneDNN capped below
  AVX512-BF16: what a CPU without it runs);
- dynamic int8 quantisation of the linear layers (`torch.ao.quantization.quantize_dynamic`, fbgemm/x86).
Each row: tokens/s (real tokens, not padding), the cosine of its standardised final-token states to the first
row's (mean and min), the largest difference, and, with the default run's `results/reward/sarm`, its accuracy on
these pairs and the pairs whose preferred response differs from the first row's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sarm.provenance import AVX2_ONLY, PORTABLE_CPU

NO_NATIVE_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}  # oneDNN's ISA just below AVX512-BF16
# name -> settings that differ from DEFAULT; `env`: the environment of the child process, `jobs`: processes at once
DEFAULT = {
    "dtype": "float32",
    "packed": True,
    "attention": "sdpa",
    "threads": None,
    "workers": True,
    "batch": 8,
    "quantised": False,
    "env": PORTABLE_CPU,
    "jobs": 1,
}
OPTIONS = {
    "float32, one sequence a row, batch 16, 2 threads (before)": dict(packed=False, workers=False, batch=16, env={}),
    "float32, shared prompts packed, batch 16, 2 threads": dict(workers=False, batch=16, env={}),
    "float32, packed, batch 16, 2 workers x 1 thread": dict(batch=16, env={}),
    "float32, packed, batch 8, 2 workers x 1 thread": dict(env={}),
    "float32, packed, batch 8, 2 workers, portable kernels (the workflow)": dict(),
    "float32, packed, batch 8, 2 workers, portable, AVX2 only (a CPU without AVX-512)": dict(env={**PORTABLE_CPU, **AVX2_ONLY}),
    "float32, packed, batch 32, 2 workers, portable": dict(batch=32),
    "float32, packed, batch 8, 2 workers, portable, eager attention": dict(attention="eager"),
    "float32, packed, batch 8, 1 thread, portable": dict(threads=1, workers=False),
    "float32, packed, batch 8, two 1-thread jobs at once, portable": dict(threads=1, workers=False, jobs=2),
    "bfloat16, packed, batch 8, 2 workers, native": dict(dtype="bfloat16", env={}),
    "bfloat16, packed, batch 8, 2 workers, emulated (oneDNN below AVX512-BF16)": dict(dtype="bfloat16", env=NO_NATIVE_BF16),
    "int8 dynamic quantisation of the linear layers, packed, batch 8, 2 workers": dict(quantised=True, env={}),
}
REFERENCE = next(iter(OPTIONS))


def native_bf16() -> bool:
    """What `model.dtype: auto` decides on this CPU."""
    from sarm.models import resolve_dtype

    return resolve_dtype("auto", "cpu") == torch.bfloat16


def option_rows(args, row) -> list[dict]:
    """One `row(...)` per option (stage_benchmark's row builder), measured in child processes."""
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, changes in OPTIONS.items():
            settings = {**DEFAULT, **changes}
            env, jobs = settings.pop("env"), settings.pop("jobs")
            settings["threads"] = settings["threads"] or args.threads
            if settings["dtype"] == "bfloat16" and not native_bf16():
                if not env:
                    rows.append(row("CPU options", name, "n/a: this CPU has no AVX512-BF16 / AMX"))
                    continue
                env = {}  # without native bf16, plain bf16 is the emulation
            outs = [Path(tmp) / f"{len(results)}-{job}.pt" for job in range(jobs)]
            start = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [sys.executable, __file__, "--child", json.dumps(settings), str(out), *common(args)],
                    env={**os.environ, **env},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for out in outs
            ]
            for proc in procs:
                _, err = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"option {name!r} failed:\n{err[-2000:]}")
            wall = time.perf_counter() - start
            measured = [torch.load(out) for out in outs]
            tokens_per_s = (
                sum(m["tokens"] / m["seconds"] for m in measured) if jobs > 1 else measured[0]["tokens"] / measured[0]["seconds"]
            )
            results[name] = (measured[0], tokens_per_s, wall)
    reference = results[REFERENCE][0]["final"]
    scores = preference_flips(args)
    for name, (measured, tokens_per_s, _) in results.items():
        cos = torch.nn.functional.cosine_similarity(measured["final"], reference)
        diff = (measured["final"] - reference).abs().max().item()
        value = f"{tokens_per_s:,.0f} tok/s; cosine to row 1 {cos.mean():.6f} (min {cos.min():.6f}), max |diff| {diff:.2g}" + (
            " (bit-identical)" if diff == 0 else ""
        )
        if scores is not None:
            value += "; " + scores(measured["final"], reference)
        rows.append(row("CPU options", name, value, "row 1 tok/s", tokens_per_s / results[REFERENCE][1]))
    return rows


def preference_flips(args):
    """A function (states, float32 states) -> "SARM accuracy …; n pairs flipped", or None without the default run."""
    if not Path(args.reward_model).exists():
        return None
    from sarm.reward_model import load_feature_head

    model = load_feature_head(args.reward_model)

    def describe(states, reference) -> str:
        with torch.no_grad():
            ours, base = model.score_hidden(states).view(-1, 2), model.score_hidden(reference).view(-1, 2)
        prefers, base_prefers = ours[:, 0] > ours[:, 1], base[:, 0] > base[:, 1]
        return (
            f"SARM accuracy {prefers.float().mean():.1%} (row 1 {base_prefers.float().mean():.1%}), "
            f"{int((prefers != base_prefers).sum())} of {len(prefers)} pairs flipped"
        )

    return describe


def common(args) -> list[str]:
    return [
        "--model",
        args.model,
        "--pairs",
        args.pairs,
        "--n-pairs",
        str(args.n_pairs),
        "--layer",
        str(args.layer),
        "--max-length",
        str(args.max_length),
    ]


def child(settings: dict, out: str, args) -> None:
    """Cache the pairs' final-token states with these settings; save them (sequence order) and the timing."""
    from sarm import activations as A
    from sarm import models
    from sarm.data import read_pairs

    torch.set_num_threads(settings["threads"])
    dtype = getattr(torch, settings["dtype"])
    model = models.load_truncated(args.model, args.layer, dtype, "cpu")
    model.config._attn_implementation = settings["attention"]
    if settings["quantised"]:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    tokenizer = models.load_tokenizer(args.model)
    sequences = A.pair_sequences(read_pairs(args.pairs).head(args.n_pairs))
    encoded = [A.encode(tokenizer, p, r, args.max_length) for p, r in zip(sequences.prompt, sequences.response)]
    groups = [json.dumps(p, sort_keys=True) if settings["packed"] else None for p in sequences.prompt]
    batches = A.packed_batches(A.packed_rows(encoded, groups, 2 * args.max_length), encoded, settings["batch"])

    def forward(batch):
        if settings["packed"]:
            return A.forward_packed(model, batch, encoded, tokenizer.pad_token_id, "cpu", False)[:2]
        members = [i for row in batch for i in row.members]
        return members, A.forward_batch(model, [encoded[i] for i in members], tokenizer.pad_token_id, "cpu", False)[0]

    forward(batches[0])  # warm-up: kernels are chosen per shape
    final = torch.zeros(len(encoded), model.config.hidden_size)
    start = time.perf_counter()
    with A.cpu_workers("cpu") if settings["workers"] else contextlib.nullcontext(SimpleNamespace(map=map)) as pool:
        for members, states in pool.map(forward, batches):
            final[members] = states
    seconds = time.perf_counter() - start
    torch.save({"final": final, "seconds": seconds, "tokens": sum(len(e.input_ids) for e in encoded)}, out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resources/models/smollm2-135m-instruct")
    p.add_argument("--pairs", default="resources/tables/val.parquet")
    p.add_argument("--reward-model", default="results/reward/sarm")
    p.add_argument("--n-pairs", type=int, default=96)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.child:
        child(json.loads(parsed.child[0]), parsed.child[1], parsed)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from stage_benchmark import describe_machine, row, table

        text = describe_machine() + f"; load average {os.getloadavg()[0]:.1f}\n\n" + table(option_rows(parsed, row)) + "\n"
        print(text)
        if parsed.out:
            Path(parsed.out).write_text(text)
