"""One run, one table: each stage's throughput on the same inputs, next to its reference and target.

    python benchmarks/stage_benchmark.py [--quick] [--device cuda --peak-tflops 989]
                                         [--random-init llama-3.1-8b --layer 16] [--out table.md]

Measured (the default run's model, tables and artefacts: `make run` first):
- caching: a bare truncated forward (plain torch, pre-tokenised, pre-padded, layers 1..L), the workflow's
  `cache_activations` (tokenise + forward + standardise + shards), a full-depth forward with
  `output_hidden_states=True`, and sae-lens' `CacheActivationsRunner` (AutoModelForCausalLM on the same
  model folder, the same tokens packed into fixed windows, stopped after layer L), all on the same pairs;
  MFU with `--peak-tflops` (forward FLOPs ~ 2 x parameters of the kept layers x real tokens);
- SAE training samples/s (sae-lens' trainer on the sentence-final vectors just cached);
- one epoch of the frozen head on the default's cached train set, dense and sparse (TopK indices + values)
  features, against one backbone pass over the same sequences (estimated from the bare forward's rate);
  30-epoch head training, dense vs sparse, with its peak RSS (a subprocess each);
- evaluation pairs/s (`score_cached`, the `sarm` model on the rb-like cache);
- the caching stage's peak RSS at two data sizes (a subprocess each: RSS sampled while it caches, and the
  process's maxrss from wait4, model loading included);
- the whole default run's wall time, from the last complete Snakemake log (not re-run here);
- with `--cpu-options`, the caching forward's CPU options side by side (`benchmarks/cpu_options.py`: float32,
  packed prompts, bf16 native and emulated, int8, threads, SDPA/eager, AVX2 only), each with its effect on the
  hidden states and on the default SARM's preferences.

`--random-init SHAPE` (a preset: llama-3.1-8b; or a model folder / config.json) builds random-init truncated
and full-depth models of that shape (the tokenizer and pairs still come from --model / --pairs) for a GPU
session; stages that need the default run's artefacts are then skipped and say so.

On a machine other jobs load, tiny ops (the head's) wait on OpenMP thread wake-ups: 2 threads measured
0.29 s an epoch where 1 thread took 0.004 s; `--threads 1` measures them without it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from sarm import activations as A
from sarm import models
from sarm.data import read_pairs
from sarm.provenance import CPU_FLAGS, machine

LLAMA_31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
PRESETS = {"llama-3.1-8b": LLAMA_31_8B}
RUNNER_CONTEXT = 256  # CacheActivationsRunner wants fixed windows: the same tokens, packed


class RssPeak:
    """Resident set size sampled every few ms while the block runs: `start` and `peak`, in MiB."""

    def __enter__(self):
        import threading

        self.start = self.peak = resident_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, resident_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_mib())


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    rows: list[dict] = []
    device = models.resolve_device(args.device)
    dtype = models.resolve_dtype(args.dtype, device)
    tokenizer = models.load_tokenizer(args.model)
    pairs = read_pairs(args.pairs).head(args.n_pairs)
    truncated, full, n_layers, source = build_models(args, dtype, device)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        forward = caching_rows(args, rows, tokenizer, pairs, truncated, full, n_layers, dtype, device, Path(tmp))
        del full
        sae_rows(args, rows, Path(tmp) / "cache", truncated.config.hidden_size, device)
    head_rows(args, rows, forward)
    eval_rows(args, rows)
    rss_rows(args, rows)
    run_row(args, rows)
    if args.cpu_options:
        from cpu_options import option_rows

        rows += option_rows(args, row)
    header = [
        f"{datetime.now():%Y-%m-%d %H:%M}, {source}, L = {args.layer} of {n_layers}, dtype {str(dtype).removeprefix('torch.')}, "
        f"device {device}, attention {truncated.config._attn_implementation}, {args.threads} threads, "
        f"{len(pairs)} pairs ({2 * len(pairs)} sequences, {forward['tokens']} tokens), batch {args.batch_size}",
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs",
        describe_machine(),
    ]
    text = "\n".join(header) + "\n\n" + table(rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def describe_machine() -> str:
    """The processor, its instructions that matter here (native bf16, VNNI for int8) and the thread settings."""
    found = machine()
    where = found.get("gpu") or found["cpu"]
    return (
        f"{where}; CPU flags {', '.join(found['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}; torch threads "
        f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resources/models/smollm2-135m-instruct")
    p.add_argument("--pairs", default="resources/tables/val.parquet", help="the pairs every forward runs on")
    p.add_argument("--train-pairs", default="resources/tables/train.parquet", help="pairs for the peak-RSS runs")
    p.add_argument("--cache-root", default="results/activations/smollm2-135m-instruct-L15")
    p.add_argument("--sae", default="results/sae/smollm2-135m-instruct-L15/model")
    p.add_argument("--reward-model", default="results/reward/sarm")
    p.add_argument("--eval-table", default="rb-like")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--run-log",
        help="the Snakemake log of the default run (default: the newest complete run "
        "that fine-tuned nothing, i.e. not config/ablations.yaml or a paper config)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU (H100 SXM: 989)")
    p.add_argument("--random-init", default=None, help="preset (llama-3.1-8b) or a folder / config.json: random weights")
    p.add_argument("--n-pairs", type=int, default=None, help="pairs every forward runs on (96; --quick 24)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each measurement; the fastest counts (2; --quick 1)")
    p.add_argument("--sae-samples", type=int, default=None, help="SAE training samples (60,000; --quick 10,000)")
    p.add_argument(
        "--rss-pairs", type=int, nargs=2, default=None, help="the two data sizes of the RSS runs (96 384; --quick 24 96)"
    )
    p.add_argument("--rss-shard-size", type=int, default=64, help="sequences per shard in the peak-RSS runs")
    p.add_argument("--no-runner", action="store_true", help="skip sae-lens' CacheActivationsRunner")
    p.add_argument("--cpu-options", action="store_true", help="also the CPU options side by side (benchmarks/cpu_options.py)")
    p.add_argument("--quick", action="store_true", help="small inputs: 24 pairs, 1 repeat, 10k SAE samples, RSS at 24/96")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = {"n_pairs": (96, 24), "repeats": (2, 1), "sae_samples": (60_000, 10_000), "rss_pairs": ([96, 384], [24, 96])}
    for key, (full, quick) in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


# --- models ---------------------------------------------------------------------------------------------
def build_models(args, dtype, device):
    """(truncated, full-depth, n_layers, description): the model folder's weights, or random ones."""
    from transformers import AutoModel

    if args.random_init is None:
        truncated = models.load_truncated(args.model, args.layer, dtype, device)
        full = AutoModel.from_pretrained(args.model, dtype=dtype).to(device).eval().requires_grad_(False)
        return truncated, full, full.config.num_hidden_layers, Path(args.model).name
    config = random_init_config(args.random_init)
    n_layers = config.num_hidden_layers
    models.check_layer(args.layer, n_layers)
    full = random_model(config, n_layers, dtype, device)
    return random_truncated(args, dtype, device), full, n_layers, f"random-init {args.random_init} shape"


def random_init_config(shape: str):
    from transformers import AutoConfig, LlamaConfig

    return LlamaConfig(**PRESETS[shape]) if shape in PRESETS else AutoConfig.from_pretrained(shape)


def random_model(config, n_layers: int, dtype, device):
    """A model of `config`'s shape with its first `n_layers` decoder layers and random weights, on `device`."""
    from transformers import AutoModel

    config = copy.deepcopy(config)  # the forward reads num_hidden_layers from the config it was built with
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:n_layers]
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModel.from_config(config, dtype=dtype).eval().requires_grad_(False)


def random_truncated(args, dtype, device):
    model = random_model(random_init_config(args.random_init), args.layer, dtype, device)
    model.norm = torch.nn.Identity()  # as models.load_truncated: layers 1..L, no final norm
    return model


def layer_parameters(model) -> int:
    """Parameters of the decoder layers (the embedding is a lookup: no FLOPs)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


# --- caching --------------------------------------------------------------------------------------------
class TimedShardWriter(A.ShardWriter):
    """The workflow's ShardWriter, timing how long the caching loop waits on it."""

    seconds = 0.0

    def add(self, *a, **k):
        start = time.perf_counter()
        super().add(*a, **k)
        TimedShardWriter.seconds += time.perf_counter() - start

    def flush(self, *a, **k):
        start = time.perf_counter()
        super().flush(*a, **k)
        TimedShardWriter.seconds += time.perf_counter() - start


def caching_rows(args, rows, tokenizer, pairs, truncated, full, n_layers, dtype, device, tmp: Path) -> dict:
    seqs = A.pair_sequences(pairs)
    start = time.perf_counter()
    encoded = [A.encode(tokenizer, p, r, args.max_length) for p, r in zip(seqs.prompt, seqs.response)]
    t_tokenise = time.perf_counter() - start
    lengths = [len(e.input_ids) for e in encoded]
    n_seq, n_tokens = len(encoded), sum(lengths)
    batches = A.length_sorted_batches(lengths, args.batch_size)
    inputs = [padded(tokenizer, [encoded[i] for i in b]) for b in batches]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare():
        for ids, mask in inputs:
            truncated(input_ids=ids.to(device), attention_mask=mask.to(device))
        sync()

    @torch.no_grad()
    def full_depth():
        for ids, mask in inputs:
            full(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True).hidden_states[args.layer]
        sync()

    def caching():
        out = tmp / "cache"
        if out.exists():
            for f in out.iterdir():
                f.unlink()
        A.cache_activations(truncated, tokenizer, pairs, out, args.max_length, args.batch_size, device)
        sync()

    bare()  # warm-up: CPU kernels are built per shape, and every batch has its own
    A.ShardWriter = TimedShardWriter
    try:
        t_bare = best(bare, args.repeats)
        TimedShardWriter.seconds = 0.0
        t_cache = best(caching, args.repeats)
        write_seconds = TimedShardWriter.seconds / args.repeats
    finally:
        A.ShardWriter = TimedShardWriter.__mro__[1]
    t_full = best(full_depth, args.repeats)

    def rate(seconds):
        return f"{n_seq / seconds:.1f} seq/s, {n_tokens / seconds:,.0f} tok/s"

    rows.append(row("caching", "bare truncated forward (layers 1..L, plain torch, one sequence a row)", rate(t_bare)))
    rows.append(
        row(
            "caching",
            "workflow `cache_activations` (tokenise + forward + standardise + shards; float32 packs shared prompts, so > 1 is possible)",
            rate(t_cache),
            "bare forward",
            t_bare / t_cache,
            ">= 0.9",
            t_bare / t_cache >= 0.9,
        )
    )
    rows.append(
        row(
            "caching",
            "  of which tokenising (chat template + offsets + sentence ends)",
            f"{t_tokenise:.2f} s",
            "caching time",
            t_tokenise / t_cache,
        )
    )
    rows.append(
        row(
            "caching",
            "  of which waiting on ShardWriter (add + write)",
            f"{write_seconds:.2f} s",
            "caching time",
            write_seconds / t_cache,
            "async writes pay off only if large",
        )
    )
    half = f"L = {args.layer} of {n_layers}" + (" (N/2)" if 2 * args.layer == n_layers else "")
    rows.append(
        row(
            "caching",
            "full-depth forward, output_hidden_states=True",
            rate(t_full),
            f"truncated speed-up, {half}",
            t_full / t_bare,
            ">= 1.8",
            t_full / t_bare >= 1.8,
        )
    )
    unsorted = [list(range(i, min(i + args.batch_size, n_seq))) for i in range(0, n_seq, args.batch_size)]
    rows.append(
        row(
            "caching",
            "padding waste, length-bucketed batches (the unpacked path: 16-bit models)",
            f"{padding_waste(lengths, batches):.1%}",
            "in arrival order",
            None,
            None,
            None,
            f"{padding_waste(lengths, unsorted):.1%}",
        )
    )
    if args.peak_tflops:
        flops = 2 * layer_parameters(truncated) * n_tokens
        for name, seconds in (("bare forward", t_bare), ("workflow caching", t_cache)):
            rows.append(
                row(
                    "caching",
                    f"MFU, {name} (2 x {layer_parameters(truncated) / 1e9:.2f} B params x tokens)",
                    f"{flops / seconds / 1e12:.2f} TFLOP/s",
                    f"peak {args.peak_tflops:g} TFLOP/s",
                    flops / seconds / 1e12 / args.peak_tflops,
                    None,
                    None,
                )
            )
    runner_row(args, rows, encoded, truncated, dtype, device, t_bare, n_tokens)
    return {"seq_per_s": n_seq / t_bare, "tokens": n_tokens}


def padded(tokenizer, batch: list[A.Encoded]):
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row_, e in enumerate(batch):
        ids[row_, : len(e.input_ids)] = torch.from_numpy(e.input_ids)
        mask[row_, : len(e.input_ids)] = 1
    return ids, mask


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / computed


def runner_row(args, rows, encoded, truncated, dtype, device, t_bare, n_tokens) -> None:
    """sae-lens' CacheActivationsRunner on the same model folder and tokens, or why it does not apply."""
    name = "sae-lens `CacheActivationsRunner` (AutoModelForCausalLM, hook model.layers.{L-1}, stops after L)"
    reason = None
    if args.no_runner:
        reason = "skipped (--no-runner)"
    elif args.random_init:
        reason = "n/a: it loads a model folder by name, and a random-init model has none"
    if reason:
        rows.append(row("caching", name, reason))
        return
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    flat = torch.cat([torch.from_numpy(e.input_ids) for e in encoded])
    batch = max(1, args.batch_size // 2)
    n_windows = len(flat) // RUNNER_CONTEXT // batch * batch
    windows = flat[: n_windows * RUNNER_CONTEXT].view(n_windows, RUNNER_CONTEXT)
    tokens = n_windows * RUNNER_CONTEXT
    d_in = truncated.config.hidden_size
    seconds = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = CacheActivationsRunnerConfig(
                dataset_path="packed-benchmark-tokens",
                model_name=args.model,
                model_class_name="AutoModelForCausalLM",
                model_batch_size=batch,
                hook_name=f"model.layers.{args.layer - 1}",
                d_in=d_in,
                training_tokens=tokens,
                context_size=RUNNER_CONTEXT,
                new_cached_activations_path=f"{tmp}/acts",
                shuffle=False,
                dtype="float32",
                device=device,
                buffer_size_gb=tokens * d_in * 4 / 1e9 * 1.001,
                prepend_bos=False,
                streaming=False,
                model_from_pretrained_kwargs={"dtype": dtype},
            )
            runner = CacheActivationsRunner(cfg, override_dataset=Dataset.from_dict({"input_ids": windows.tolist()}))
            start = time.perf_counter()
            runner.run()
            seconds.append(time.perf_counter() - start)
    t = min(seconds)
    rows.append(
        row(
            "caching",
            name,
            f"{tokens / t:,.0f} tok/s ({n_windows} windows of {RUNNER_CONTEXT}, every token stored)",
            "bare forward tok/s",
            (tokens / t) / (n_tokens / t_bare),
            None,
            None,
        )
    )


# --- SAE ------------------------------------------------------------------------------------------------
def sae_rows(args, rows, cache_dir: Path, d_in: int, device: str) -> None:
    from sarm.sae import default_k, default_width, train_sae

    cache = A.ActivationCache(cache_dir)
    vectors = list(cache.sentence_shards())
    width, k = default_width(d_in), default_k(d_in)
    start = time.perf_counter()
    train_sae(vectors, d_in, width, k, args.sae_samples, batch_size=256, lr=0.002, device=device)
    seconds = time.perf_counter() - start
    rate = args.sae_samples / seconds
    reference, ratio = "the default's 300k samples", None
    logged = Path("logs/benchmarks/sae/smollm2-135m-instruct-L15.tsv")
    if logged.exists() and not args.random_init:
        logged_s = float(logged.read_text().splitlines()[1].split("\t")[0])
        reference, ratio = (
            f"workflow log: {300_000 / logged_s:,.0f} samples/s (300k in {logged_s:.0f} s)",
            rate / (300_000 / logged_s),
        )
    rows.append(
        row(
            "SAE",
            f"SAE training ({width:,} latents, k = {k}, batch 256, {args.sae_samples:,} samples)",
            f"{rate:,.0f} samples/s (300k: {300_000 / rate:.0f} s)",
            reference,
            ratio,
            None,
            None,
        )
    )


# --- reward head ----------------------------------------------------------------------------------------
def head_rows(args, rows, forward: dict) -> None:
    from sarm.reward import train_head
    from sarm.reward_model import sae_features
    from sarm.sae import load_sae

    missing = [p for p in (Path(args.cache_root) / "train", Path(args.cache_root) / "val", Path(args.sae)) if not p.exists()]
    if args.random_init or missing:
        why = "random-init shape" if args.random_init else f"{missing[0]} missing (make run)"
        rows.append(row("head", "one head epoch on cached features vs one backbone pass", f"skipped: {why}"))
        return
    sae = load_sae(args.sae)
    train, val = (
        A.ActivationCache(Path(args.cache_root) / "train").final(),
        A.ActivationCache(Path(args.cache_root) / "val").final(),
    )
    backbone = len(train) / forward["seq_per_s"]
    for kind, sparse in (("dense", False), ("sparse", True)):
        t_train, t_val = sae_features(sae, train, sparse=sparse), sae_features(sae, val, sparse=sparse)
        stamps = [time.perf_counter()]
        train_head(t_train, t_val, epochs=5, lr=0.01, batch_size=64, log=lambda _: stamps.append(time.perf_counter()))
        epoch = sorted(b - a for a, b in zip(stamps, stamps[1:]))[2]  # the median of 5
        rows.append(
            row(
                "head",
                f"one head epoch, {kind} features ({len(train)} sequences; median of 5)",
                f"{epoch:.3f} s",
                f"backbone pass {backbone:.0f} s (est., bare rate)",
                backbone / epoch,
                ">= 50x",
                backbone / epoch >= 50,
            )
        )
    results = {kind: run_child(args, ["head", kind])[0] for kind in ("dense", "sparse")}
    for kind, info in results.items():
        rows.append(
            row(
                "head",
                f"30-epoch head training, {kind} features (`sae_features` / `train_head`, fastest of {args.repeats})",
                f"{info['encode_seconds']:.2f} s / {info['train_seconds']:.2f} s; features {info['feature_bytes'] / 2**20:.1f} MiB; "
                f"peak RSS +{info['encoding_peak_mib']:.0f} MiB encoding, +{info['training_peak_mib']:.0f} MiB training",
                *(
                    ("dense, training time", results["dense"]["train_seconds"] / info["train_seconds"])
                    if kind == "sparse"
                    else ()
                ),
            )
        )


# --- evaluation -----------------------------------------------------------------------------------------
def eval_rows(args, rows) -> None:
    from sarm.evaluate import score_cached
    from sarm.reward_model import load_feature_head

    cache = Path(args.cache_root) / args.eval_table
    table = Path(args.pairs).with_name(f"{args.eval_table}.parquet")
    missing = [p for p in (cache, table, Path(args.reward_model)) if not p.exists()]
    if args.random_init or missing:
        why = "random-init shape" if args.random_init else f"{missing[0]} missing (make run)"
        rows.append(row("evaluate", "evaluation from cached states", f"skipped: {why}"))
        return
    pairs = read_pairs(table)
    start = time.perf_counter()
    model = load_feature_head(args.reward_model)
    score_cached(model, A.ActivationCache(cache), pairs)
    seconds = time.perf_counter() - start
    rows.append(
        row(
            "evaluate",
            f"`score_cached`, {Path(args.reward_model).name} on {args.eval_table} (load + read + SAE + head)",
            f"{len(pairs) / seconds:,.0f} pairs/s ({len(pairs)} pairs, {seconds:.2f} s)",
        )
    )


# --- peak RSS -------------------------------------------------------------------------------------------
def rss_rows(args, rows) -> None:
    if not Path(args.train_pairs).exists():
        rows.append(row("memory", "caching peak RSS at two data sizes", f"skipped: {args.train_pairs} missing"))
        return
    small, large = args.rss_pairs
    runs = {n: run_child(args, ["cache", str(n)]) for n in (small, large)}
    for n, (info, maxrss_kb) in runs.items():
        what = f"caching peak RSS, {n} pairs" + (f" (shards of {args.rss_shard_size} sequences)" if n == small else "")
        value = (
            f"{info['caching_peak_mib']:,.0f} MiB while caching ({info['n_shards']} shards; "
            f"{info['loaded_mib']:,.0f} once loaded; process peak {maxrss_kb / 1024:,.0f})"
        )
        ratio = info["caching_peak_mib"] / runs[small][0]["caching_peak_mib"]
        rows.append(
            row("memory", what, value, *((f"{small} pairs", ratio, "<= 1.10 (flat)", ratio <= 1.10) if n == large else ()))
        )


def run_child(args, what: list[str]) -> tuple[dict, int]:
    """Run this script's `--child` mode in a fresh process: (its JSON answer, its peak RSS in KiB)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        *what,
        "--threads",
        str(args.threads),
        "--model",
        args.model,
        "--train-pairs",
        args.train_pairs,
        "--cache-root",
        args.cache_root,
        "--sae",
        args.sae,
        "--max-length",
        str(args.max_length),
        "--batch-size",
        str(args.batch_size),
        "--layer",
        str(args.layer),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--rss-shard-size",
        str(args.rss_shard_size),
        "--repeats",
        str(max(3, args.repeats)),
    ] + (["--random-init", args.random_init] if args.random_init else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"child {' '.join(what)} failed (status {status}); run: {' '.join(cmd)}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss


def child(args) -> None:
    kind = args.child[0]
    if kind == "cache":
        device = models.resolve_device(args.device)
        tokenizer = models.load_tokenizer(args.model)
        dtype = models.resolve_dtype(args.dtype, device)
        if args.random_init:
            model = random_truncated(args, dtype, device)
        else:
            model = models.load_truncated(args.model, args.layer, dtype, device)
        pairs = read_pairs(args.train_pairs).head(int(args.child[1]))
        with tempfile.TemporaryDirectory() as tmp, RssPeak() as rss:
            info = A.cache_activations(
                model, tokenizer, pairs, tmp, args.max_length, args.batch_size, device, shard_size=args.rss_shard_size
            )
        print(json.dumps({"n_shards": info["n_shards"], "loaded_mib": rss.start, "caching_peak_mib": rss.peak}))
    elif kind == "head":
        from sarm.reward import train_head
        from sarm.reward_model import sae_features
        from sarm.sae import load_sae

        sae = load_sae(args.sae)
        train, val = (
            A.ActivationCache(Path(args.cache_root) / "train").final(),
            A.ActivationCache(Path(args.cache_root) / "val").final(),
        )
        sparse = args.child[1] == "sparse"
        encode_s, train_s, peaks = [], [], []
        for _ in range(args.repeats):  # the machine may be shared: the fastest run counts
            start = time.perf_counter()
            with RssPeak() as encoding:
                t_train, t_val = sae_features(sae, train, sparse=sparse), sae_features(sae, val, sparse=sparse)
            encode_s.append(time.perf_counter() - start)
            with RssPeak() as training:
                train_head(t_train, t_val, epochs=30, lr=0.01, batch_size=64)
            train_s.append(time.perf_counter() - start - encode_s[-1])
            peaks.append((encoding.peak - encoding.start, training.peak - encoding.start))
        print(
            json.dumps(
                {
                    "encode_seconds": min(encode_s),
                    "train_seconds": min(train_s),
                    "feature_bytes": t_train.nbytes + t_val.nbytes,
                    "encoding_peak_mib": peaks[0][0],
                    "training_peak_mib": peaks[0][1],  # the first run: later ones reuse freed memory
                }
            )
        )


# --- the whole run --------------------------------------------------------------------------------------
def run_row(args, rows) -> None:
    """Wall time of the default run, from its Snakemake log (`--run-log`, else the complete run with the most
    steps, the newest among equals, that fine-tuned nothing: not config/ablations.yaml or a paper config)."""
    best_log = None
    logs = [Path(args.run_log)] if args.run_log else sorted(Path(".snakemake/log").glob("*.snakemake.log"))
    for log in logs:
        text = log.read_text(errors="replace")
        found = re.findall(r"(\d+) of \1 steps \(100%\) done", text)
        if found and (args.run_log or "finetune_reward" not in text) and (best_log is None or int(found[-1]) >= best_log[0]):
            best_log = (int(found[-1]), log)
    if best_log is None or args.random_init:
        rows.append(row("workflow", "whole default run", "no complete Snakemake log here (make run)"))
        return
    steps, log = best_log
    began = datetime.strptime(log.name.split(".")[0], "%Y-%m-%dT%H%M%S")
    seconds = log.stat().st_mtime - began.timestamp()
    rows.append(
        row(
            "workflow",
            f"whole default run ({steps} steps; .snakemake/log/{log.name}, not re-run here)",
            f"{seconds / 60:.1f} min",
            "15 min",
            seconds / 900,
            "<= 1.0",
            seconds <= 900,
        )
    )


# --- output ---------------------------------------------------------------------------------------------
def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def row(stage, what, value, reference=None, ratio=None, target=None, met=None, reference_value=None) -> dict:
    ref = reference if reference_value is None else f"{reference}: {reference_value}"
    return {
        "stage": stage,
        "measurement": what,
        "value": value,
        "reference": ref or "",
        "ratio": "" if ratio is None else f"{ratio:,.2f}",
        "target": target or "",
        "met": "" if met is None else ("yes" if met else "**no**"),
    }


def table(rows: list[dict]) -> str:
    keys = ["stage", "measurement", "value", "reference", "ratio", "target", "met"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
