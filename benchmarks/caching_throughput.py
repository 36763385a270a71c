"""Caching throughput against a bare truncated forward and a full-depth forward, on the same inputs.

    python benchmarks/caching_throughput.py [--model resources/models/smollm2-135m-instruct] [--pairs 96]

Needs the default run's model and val table (`make run`, or `snakemake resources/tables/val.parquet
resources/models/smollm2-135m-instruct`). Prints sequences/s and tokens/s of each.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModel

from sarm import activations as A
from sarm import models
from sarm.data import read_pairs


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resources/models/smollm2-135m-instruct")
    parser.add_argument("--pairs", default="resources/tables/val.parquet")
    parser.add_argument("--n-pairs", type=int, default=96)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = models.resolve_dtype("auto")
    tokenizer = models.load_tokenizer(args.model)
    pairs = read_pairs(args.pairs).head(args.n_pairs)
    seqs = A.pair_sequences(pairs)
    encoded = [A.encode(tokenizer, p, r, args.max_length) for p, r in zip(seqs.prompt, seqs.response)]
    batches = A.length_sorted_batches([len(e.input_ids) for e in encoded], args.batch_size)
    n_tokens = sum(len(e.input_ids) for e in encoded)

    def padded(batch):
        width = max(len(encoded[i].input_ids) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : len(encoded[i].input_ids)] = torch.from_numpy(encoded[i].input_ids)
            mask[row, : len(encoded[i].input_ids)] = 1
        return ids, mask

    inputs = [padded(b) for b in batches]
    truncated = models.load_truncated(args.model, args.layer, dtype)
    full = AutoModel.from_pretrained(args.model, dtype=dtype).eval()

    @torch.no_grad()
    def bare():
        for ids, mask in inputs:
            truncated(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def full_depth():
        for ids, mask in inputs:
            full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[args.layer]

    bare()  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "bare truncated forward (layers 1..L)": timed(bare),
            "workflow caching (tokenise + forward + standardise + shards)": timed(
                lambda: A.cache_activations(truncated, tokenizer, pairs, tmp, args.max_length, args.batch_size)
            ),
            "full-depth forward, output_hidden_states=True": timed(full_depth),
        }
    print(f"{len(encoded)} sequences, {n_tokens} tokens, dtype {dtype}, {args.threads} threads, L = {args.layer}")
    base = results["bare truncated forward (layers 1..L)"]
    for name, seconds in results.items():
        print(f"{name:64s} {len(encoded) / seconds:7.1f} seq/s {n_tokens / seconds:8.0f} tok/s  x{base / seconds:.2f} of bare")


if __name__ == "__main__":
    main()
