"""Serve a reward model over HTTP: an OpenRLHF-compatible `POST /get_reward`, with concurrent requests batched.

    sarm serve --model results/reward/sarm [--host 127.0.0.1 --port 8000 --max-batch 16 --max-wait-ms 5]

Request bodies (JSON), one of:
- `{"query": ["<full text>", ...]}`: OpenRLHF's remote reward model (`--remote_rm_url http://host:port/get_reward`).
  Each text is a whole conversation already rendered with the base model's chat template (as
  `tokenizer.apply_chat_template(messages, tokenize=False)` writes it). Trailing end-of-turn / EOS / pad tokens
  and whitespace are dropped and one end-of-turn token is put back, so padded texts, and texts with or
  without the final end-of-turn token, score alike. Other keys OpenRLHF sends beside `query` (`prompts`,
  `labels`) are ignored.
- `{"prompts": [...], "responses": [...]}`: raw text; a prompt is a string (one user turn) or a list of
  `{"role", "content"}` messages; the server applies the chat template (as `RewardModel.score` does).
- `{"messages": [[{"role": ..., "content": ...}, ..., {"role": "assistant", ...}], ...]}`: whole
  conversations, each ending in the assistant turn that is scored.
Optional: `"return_attributions": k` adds, per reward, its k largest feature contributions w_i z_i (by
magnitude; for SARM the features are SAE latents, whose contributions sum to the reward).

Response: `{"rewards": [...], "truncated": [...], "n_tokens": [...], "max_length": L}` (+ `"attributions"`).
A text longer than the model's max_length keeps its last L tokens (where the reward is read) and is marked in
`truncated`. A malformed request gets a 4xx with `{"error": "..."}`; the server keeps serving.
`GET /health` describes the model; `GET /stats` counts requests, sequences and batches.

Batching: handler threads put requests on a queue; one worker thread takes the first, keeps collecting for
up to `max_wait_ms` or until `max_batch` sequences are gathered, and runs them as one length-sorted forward
(a single request with more sequences than `max_batch` runs alone, in forwards of `max_batch`).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from sarm.errors import SarmError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    """A request the client must fix: answered with 400 (or the given status) and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------------------
# Parsing a request body into items: ("text", str) or ("pair", prompt, response)
# --------------------------------------------------------------------------------------------------------------

FORMS = '{"query": [text, ...]}, {"prompts": [...], "responses": [...]} or {"messages": [[message, ...], ...]}'


def _list_of(body: dict, key: str) -> list:
    value = body[key]
    if not isinstance(value, list):
        raise BadRequest(f'"{key}" must be a list, got {type(value).__name__}')
    if not value:
        raise BadRequest(f'"{key}" is an empty list: nothing to score')
    return value


def _string(value, where: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"{where} is empty")
    return value


def _message_list(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{where} must be a non-empty list of {{role, content}} messages")
    for j, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise BadRequest(f"{where}[{j}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_request(body) -> tuple[list[tuple], int]:
    """(items, top_k) of a decoded JSON body; raises BadRequest naming what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object: {FORMS}")
    top_k = body.get("return_attributions", 0)
    if top_k is None or top_k is False:
        top_k = 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise BadRequest(f'"return_attributions" must be a non-negative integer (top-k features), got {top_k!r}')
    if "query" in body:
        items = [("text", _string(t, f"query[{i}]")) for i, t in enumerate(_list_of(body, "query"))]
    elif "prompts" in body or "responses" in body:
        if "prompts" not in body or "responses" not in body:
            raise BadRequest('"prompts" and "responses" go together')
        prompts, responses = _list_of(body, "prompts"), _list_of(body, "responses")
        if len(prompts) != len(responses):
            raise BadRequest(f"{len(prompts)} prompts but {len(responses)} responses")
        items = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            prompt = _string(p, f"prompts[{i}]") if isinstance(p, str) else _message_list(p, f"prompts[{i}]")
            items.append(("pair", prompt, _string(r, f"responses[{i}]")))
    elif "messages" in body:
        items = []
        for i, conversation in enumerate(_list_of(body, "messages")):
            messages = _message_list(conversation, f"messages[{i}]")
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise BadRequest(f"messages[{i}] must end in the assistant turn to score, after at least one other turn")
            items.append(("pair", messages[:-1], _string(messages[-1]["content"], f"messages[{i}][-1].content")))
    else:
        raise BadRequest(f"expected one of {FORMS}; got keys {sorted(body)}")
    return items, top_k


# --------------------------------------------------------------------------------------------------------------
# The batching worker
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    items: list
    top_k: int
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: BaseException | None = None


class RewardService:
    """Scores requests with one `RewardModel`, batching concurrent ones in a worker thread."""

    def __init__(self, model, max_batch: int = 16, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise SarmError(f"--max-batch must be at least 1, got {max_batch}")
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        if model._backbone is None:
            model.load_backbone(model.device)
        self.max_length = model.config["base_model"]["max_length"]
        self.stats = {"requests": 0, "sequences": 0, "batches": 0, "forwards": 0, "truncated": 0}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._held: _Job | None = None
        self._worker = threading.Thread(target=self._loop, name="sarm-batcher", daemon=True)
        self._worker.start()

    def score(self, items: list, top_k: int = 0) -> dict:
        """Score one request's items (blocking until its batch has run)."""
        top_k = min(top_k, len(self.model.weight))
        job = _Job(items, top_k)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _collect(self) -> list[_Job] | None:
        first = self._held or self._queue.get()
        self._held = None
        if first is None:
            return None
        jobs, n = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self._queue.put(None)
                break
            if n + len(job.items) > self.max_batch:
                self._held = job  # the next batch starts with it
                break
            jobs.append(job)
            n += len(job.items)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            try:
                self._run(jobs)
            except BaseException as e:  # a failed batch answers its requests with 500; the worker goes on
                log.exception("batch of %d requests failed", len(jobs))
                for job in jobs:
                    job.error = e
            for job in jobs:
                job.done.set()

    @torch.no_grad()
    def _run(self, jobs: list[_Job]) -> None:
        model = self.model
        items = [item for job in jobs for item in job.items]
        texts = [i for i, item in enumerate(items) if item[0] == "text"]
        pairs = [i for i, item in enumerate(items) if item[0] == "pair"]
        encoded = [None] * len(items)
        for i, e in zip(texts, model.encode_texts([items[i][1] for i in texts])):
            encoded[i] = e
        for i, e in zip(pairs, model.encode([items[i][1] for i in pairs], [items[i][2] for i in pairs])):
            encoded[i] = e
        features = model.features(model.hidden_encoded(encoded, self.max_batch))
        rewards = (features @ model.weight).tolist()
        top_k = max(job.top_k for job in jobs)
        if top_k:
            contributions = model.contributions(features)
            top = contributions.abs().topk(top_k, dim=1).indices
        start = 0
        for job in jobs:
            rows = range(start, start + len(job.items))
            start += len(job.items)
            bad = [i for i, row in enumerate(rows) if not math.isfinite(rewards[row])]
            if bad:
                job.error = RuntimeError(f"the reward of item {bad[0]} is not finite ({rewards[rows[bad[0]]]})")
                continue
            result = {
                "rewards": [rewards[row] for row in rows],
                "truncated": [bool(encoded[row].truncated) for row in rows],
                "n_tokens": [len(encoded[row].input_ids) for row in rows],
                "max_length": self.max_length,
            }
            if job.top_k:
                result["attributions"] = [
                    [
                        {"feature": int(f), "contribution": float(contributions[row, f]),
                         "activation": float(features[row, f]), "weight": float(model.weight[f])}
                        for f in top[row, : job.top_k].tolist()
                    ]
                    for row in rows
                ]
            job.result = result
        with self._lock:
            self.stats["requests"] += len(jobs)
            self.stats["sequences"] += len(encoded)
            self.stats["batches"] += 1
            self.stats["forwards"] += math.ceil(len(encoded) / self.max_batch)
            self.stats["truncated"] += sum(e.truncated for e in encoded)

    def describe(self) -> dict:
        base = self.model.config["base_model"]
        return {
            "status": "ok", "features": self.model.config["features"], "n_features": len(self.model.weight),
            "base_model": base.get("hub_id") or base["name"], "layer": base["layer"], "max_length": self.max_length,
            "max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000,
        }


# --------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sarm-serve"
    service: RewardService  # set on the subclass made by make_server

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._send(200, self.service.describe())
        elif self.path == "/stats":
            with self.service._lock:
                self._send(200, dict(self.service.stats))
        else:
            self._error(404, f"no such path {self.path!r}: POST /get_reward, GET /health, GET /stats")

    def do_POST(self):  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            return self._error(411, "a Content-Length header is required")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(413, f"the body has {length} bytes, more than the {MAX_BODY_BYTES} allowed")
        raw = self.rfile.read(length)
        if self.path != "/get_reward":
            return self._error(404, f"no such path {self.path!r}: POST /get_reward")
        try:
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not valid JSON ({e})") from None
            items, top_k = parse_request(body)
            result = self.service.score(items, top_k)
        except BadRequest as e:
            return self._error(e.status, str(e))
        except Exception as e:  # the model failed: say so, keep serving
            log.exception("scoring failed")
            return self._error(500, f"scoring failed: {type(e).__name__}: {e}")
        self._send(200, result)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog (socketserver's default of 5 resets bursts of clients)


def make_server(model, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, max_wait_ms: float = 5.0) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer serving `model` (port 0: a free port; see `server.server_address`). Run it with
    `serve_forever()`; `shutdown()` then `server.service.close()` stop it."""
    service = RewardService(model, max_batch, max_wait_ms)
    handler = type("Handler", (_Handler,), {"service": service})
    server = _Server((host, port), handler)
    server.service = service
    return server


def _serve(args) -> None:
    from sarm.reward import RewardModel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = RewardModel.from_pretrained(args.model, device=args.device)
    model.load_backbone(model.device)
    try:
        server = make_server(model, args.host, args.port, args.max_batch, args.max_wait_ms)
    except OSError as e:
        raise SarmError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    host, port = server.server_address[:2]
    print(f"sarm serve: {args.model} listening on http://{host}:{port}/get_reward", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.service.close()


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve a reward model over HTTP (OpenRLHF-compatible POST /get_reward)")
    serve.add_argument("--model", required=True, help="a reward model folder, e.g. results/reward/sarm")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--max-batch", type=int, default=16, help="sequences per forward pass")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    serve.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    serve.set_defaults(func=_serve)


if __name__ == "__main__":  # python -m sarm.serve ...
    from sarm.cli import main

    main(["serve", *sys.argv[1:]])
