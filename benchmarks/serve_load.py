"""Reward-server throughput and latency under a bounded loopback load, for several --max-batch values.

    python benchmarks/serve_load.py [--model results/reward/sarm] [--requests 160] [--concurrency 16]
                                    [--batch-sizes 1 16] [--max-seconds 90] [--threads 2]

For each batch size it starts `sarm serve --model ... --port 0 --max-batch B` as a subprocess, sends two
warm-up requests, then `--requests` requests (one real (prompt, response) pair each, from the default run's
val table) from `--concurrency` client threads, stopping early after `--max-seconds`. Prints requests/s,
p50/p99 latency and the mean number of sequences per forward batch (from the server's /stats). Needs the
default run's reward model and val table (`make run`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pandas as pd

from sarm.data import read_pairs


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def start_server(model: str, max_batch: int, threads: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "sarm.cli", "serve", "--model", model, "--port", "0", "--max-batch", str(max_batch),
               "--threads", str(threads), "--max-wait-ms", str(max_wait_ms)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        sys.exit(f"the server did not start: {line!r}")
    return process, line.split("listening on ")[1].strip().removesuffix("/get_reward")


def load(url: str, bodies: list[dict], n_requests: int, concurrency: int, max_seconds: float) -> dict:
    counter, lock, latencies, errors = itertools.count(), threading.Lock(), [], []
    start = time.perf_counter()
    deadline = start + max_seconds

    def client():
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= n_requests:
                return
            sent = time.perf_counter()
            try:
                post(f"{url}/get_reward", bodies[i % len(bodies)])
            except OSError as e:  # counted, not fatal: a benchmark reports its failures
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - sent)

    workers = [threading.Thread(target=client) for _ in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "errors": len(errors), "seconds": round(wall, 1), "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 0), "p99_ms": round(float(np.percentile(lat, 99)), 0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="results/reward/sarm")
    parser.add_argument("--pairs", default="resources/tables/val.parquet")
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-seconds", type=float, default=90)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    args = parser.parse_args()
    pairs = read_pairs(args.pairs)
    bodies = [{"prompts": [p], "responses": [r]} for p, r in zip(pairs.prompt, pairs.chosen)]
    rows = []
    for max_batch in args.batch_sizes:
        process, url = start_server(args.model, max_batch, args.threads, args.max_wait_ms)
        try:
            for body in bodies[:2]:
                post(f"{url}/get_reward", body)  # warm-up
            before = json.loads(urllib.request.urlopen(f"{url}/stats").read())
            row = {"max_batch": max_batch, "concurrency": args.concurrency,
                   **load(url, bodies, args.requests, args.concurrency, args.max_seconds)}
            after = json.loads(urllib.request.urlopen(f"{url}/stats").read())
            batches = after["batches"] - before["batches"]
            row["mean_batch"] = round((after["sequences"] - before["sequences"]) / max(batches, 1), 1)
            row["truncated"] = after["truncated"] - before["truncated"]
            rows.append(row)
            print(row, flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
