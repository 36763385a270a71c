"""Serve a reward model over HTTP: an OpenRLHF-compatible `POST /get_reward`, with concurrent requests batched.

    sarm serve --model results/reward/sarm [--host 127.0.0.1 --port 8000 --max-batch 16 --max-wait-ms 5]
               [--max-items 256 --max-text-chars 100000 --max-body-mb 16 --request-timeout 120 ...]

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
Any saved reward model with a head on layer L's states is served (`reward_model.load_base_head`): the SARM and
dense heads, frozen or tuned, SparseRM, and the multi-objective model (which reads the prompt's state where the
response starts, so it takes `prompts`/`responses` or `messages`, not `query` texts); a full-depth classifier is not.
Optional: `"return_attributions": k` (a linear head) adds, per reward, its k largest feature contributions w_i z_i (by
magnitude; for SARM the features are SAE latents, whose contributions sum to the reward). `"token_rewards": true`
adds, per reward, the head applied at every token of the response (`sarm.token_rewards`): `{"tokens",
"offsets", "rewards", "reward", "truncated", "dense"}`, the last of `rewards` being the reward and `dense` their
differences r_t - r_{t-1} (for RL credit assignment); for a `query` text, whose response start is not known,
every token of the (kept) text.

Response: `{"rewards": [...], "truncated": [...], "n_tokens": [...], "max_length": L}` (+ `"attributions"`,
`"token_rewards"`).
A text longer than the model's max_length keeps its last L tokens (where the reward is read) and is marked in
`truncated`. A refused request gets a 4xx/5xx with `{"error": "..."}`; the server keeps serving.
`GET /health` describes the model and the limits; `GET /stats` counts requests, sequences, batches and refusals.

Limits (`Limits`; each a `sarm serve` flag): everything one client controls is bounded, so that no client can
starve the others or exhaust the machine.
- Connections: at most `max_connections` at once (one handler thread each; over it: 503), at most
  `max_client_connections` from one address (429). A connection that sends nothing for `idle_timeout`
  seconds is closed; a request (line, headers and body) that has not fully arrived `read_timeout` seconds
  after its first byte gets 408 and the connection is closed (a client trickling 1 byte/s is cut off).
- The body: a `Content-Length` is required (411; chunked transfer encoding is not read: 411, or 400 beside
  a Content-Length), a digits-only one (negative, signed or not an integer: 400), at most `max_body_bytes`
  (413, without reading the body).
- A request: at most `max_items` texts (413) of at most `max_text_chars` characters each (413; for
  prompt/response pairs and conversations, the contents together plus 16 per message for the chat markup),
  checked before anything is tokenised. It is answered within `request_timeout` seconds of arriving
  (tokenising, queueing and scoring), else 503, and its unscored items are dropped.
- The queue: at most `max_queue_items` items waiting (503) and `max_client_queue_items` from one address (429).
- Memory: at most `max_parsing` bodies are decoded from JSON at once (decoding can take 25x the body's size,
  e.g. `[{}, {}, ...]`); the others wait for a turn within their request_timeout. Each request's texts are
  dropped once tokenised, so a waiting request holds only token ids.
Stripping the trailing end-of-turn tokens is linear in the text (`reward.strip_trailing`).

Batching and fairness: a handler thread tokenises its request's items (in parallel with the worker), then
queues them. One worker thread waits for items, keeps collecting for up to `max_wait_ms` or until `max_batch`
items wait, and runs at most `max_batch` items as one length-sorted forward. A batch is filled round-robin,
one item at a time, over the client addresses with waiting items, and within one address over its requests:
a large request is split into forwards of at most `max_batch` items, and a one-item request that arrives
meanwhile waits for at most the forward under way, then rides in the next one: its latency is bounded by two
forwards of `max_batch` sequences (on a CPU, lower `--max-batch` to shorten them), not by the queue.
After refusing a request whose body may still be coming, the server reads and drops it for up to
LINGER_SECONDS (4 bodies' worth at most) before closing, so a client that sends its whole body before reading
gets the refusal, not a connection reset.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from sarm.errors import SarmError
from sarm.token_rewards import of_feature_head as per_token_rewards

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MESSAGE_MARKUP_CHARS = 16  # what one message counts toward max_text_chars beside its content (the chat markup)
LINGER_SECONDS = 2.0  # after a refusal, how long the rest of a request is read and dropped before closing


@dataclass(frozen=True)
class Limits:
    """What the server accepts from its clients; see the module docstring. Times in seconds."""

    max_items: int = 256
    max_text_chars: int = 100_000
    max_body_bytes: int = 16 * 2**20
    request_timeout: float = 120.0
    read_timeout: float = 30.0
    idle_timeout: float = 10.0
    max_connections: int = 64
    max_client_connections: int = 32
    max_queue_items: int = 4096
    max_client_queue_items: int = 1024
    max_parsing: int = 4

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value > 0:
                raise SarmError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not self.max_items <= self.max_client_queue_items <= self.max_queue_items:
            raise SarmError(
                f"--max-items ({self.max_items}) <= --max-client-queue-items ({self.max_client_queue_items}) "
                f"<= --max-queue-items ({self.max_queue_items}) is required: a request must fit the queue"
            )
        if self.max_client_connections > self.max_connections:
            raise SarmError(
                f"--max-client-connections ({self.max_client_connections}) is more than --max-connections ({self.max_connections})"
            )


class BadRequest(Exception):
    """A request the server will not score: answered with 400 (or the given status) and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------------------------
# Parsing a request body into items: ("text", str) or ("pair", prompt, response)
# --------------------------------------------------------------------------------------------------------------

FORMS = '{"query": [text, ...]}, {"prompts": [...], "responses": [...]} or {"messages": [[message, ...], ...]}'


def _list_of(body: dict, key: str, limits: Limits) -> list:
    value = body[key]
    if not isinstance(value, list):
        raise BadRequest(f'"{key}" must be a list, got {type(value).__name__}')
    if not value:
        raise BadRequest(f'"{key}" is an empty list: nothing to score')
    if len(value) > limits.max_items:
        raise BadRequest(
            f'"{key}" has {len(value)} items, more than the {limits.max_items} allowed per request (--max-items): split it', 413
        )
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
            raise BadRequest(f'{where}[{j}] must be {{"role": one of {list(ROLES)}, "content": a string}}')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _chars(prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt) + MESSAGE_MARKUP_CHARS
    return sum(len(m["content"]) + MESSAGE_MARKUP_CHARS for m in prompt)


def _check_size(item: tuple, where: str, limits: Limits) -> tuple:
    n = len(item[1]) if item[0] == "text" else _chars(item[1]) + _chars(item[2])
    if n > limits.max_text_chars:
        raise BadRequest(
            f"{where} has {n} characters, more than the {limits.max_text_chars} allowed per text (--max-text-chars)", 413
        )
    return item


@dataclass(frozen=True)
class Options:
    """What a request asks for beside the rewards: `return_attributions` (top_k) and `token_rewards`."""

    top_k: int = 0
    token_rewards: bool = False


def parse_request(body, limits: Limits | None = None) -> tuple[list[tuple], Options]:
    """(items, options) of a decoded JSON body; raises BadRequest naming what is wrong (413: over a limit)."""
    limits = limits or Limits()
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object: {FORMS}")
    top_k = body.get("return_attributions", 0)
    if top_k is None or top_k is False:
        top_k = 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise BadRequest(f'"return_attributions" must be a non-negative integer (top-k features), got {str(top_k)[:40]!r}')
    token_rewards = body.get("token_rewards", False)
    if not isinstance(token_rewards, bool):
        raise BadRequest(f'"token_rewards" must be true or false, got {str(token_rewards)[:40]!r}')
    if "query" in body:
        items = [
            _check_size(("text", _string(t, f"query[{i}]")), f"query[{i}]", limits)
            for i, t in enumerate(_list_of(body, "query", limits))
        ]
    elif "prompts" in body or "responses" in body:
        if "prompts" not in body or "responses" not in body:
            raise BadRequest('"prompts" and "responses" go together')
        prompts, responses = _list_of(body, "prompts", limits), _list_of(body, "responses", limits)
        if len(prompts) != len(responses):
            raise BadRequest(f"{len(prompts)} prompts but {len(responses)} responses")
        items = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            prompt = _string(p, f"prompts[{i}]") if isinstance(p, str) else _message_list(p, f"prompts[{i}]")
            items.append(
                _check_size(("pair", prompt, _string(r, f"responses[{i}]")), f"prompts[{i}] with responses[{i}]", limits)
            )
    elif "messages" in body:
        items = []
        for i, conversation in enumerate(_list_of(body, "messages", limits)):
            messages = _message_list(conversation, f"messages[{i}]")
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise BadRequest(f"messages[{i}] must end in the assistant turn to score, after at least one other turn")
            item = ("pair", messages[:-1], _string(messages[-1]["content"], f"messages[{i}][-1].content"))
            items.append(_check_size(item, f"messages[{i}]", limits))
    else:
        raise BadRequest(f"expected one of {FORMS}; got keys {sorted(body)[:20]}")
    return items, Options(top_k, token_rewards)


# --------------------------------------------------------------------------------------------------------------
# The scheduler and the batching worker
# --------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    client: str
    encoded: list
    top_k: int
    token_rewards: bool = False
    next: int = 0  # the next item to put in a batch
    scored: int = 0
    rewards: list = field(default_factory=list)
    attributions: list = field(default_factory=list)
    per_token: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self):
        self.rewards = [None] * len(self.encoded)
        self.attributions = [None] * len(self.encoded)
        self.per_token = [None] * len(self.encoded)


class RewardService:
    """Scores requests with one `RewardModel`: handler threads tokenise and queue, one worker thread runs
    batches filled round-robin over clients (addresses), then over each client's requests."""

    def __init__(self, model, max_batch: int = 16, max_wait_ms: float = 5.0, limits: Limits | None = None):
        if max_batch < 1:
            raise SarmError(f"--max-batch must be at least 1, got {max_batch}")
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.limits = limits or Limits()
        if model._backbone is None:
            model.load_backbone(model.device)
        self.max_length = model.config["base_model"]["max_length"]
        self.model_kind = f"a {model.config['format']} reward model"
        self.stats = {"requests": 0, "sequences": 0, "batches": 0, "forwards": 0, "truncated": 0, "refused": {}}
        self._lock = threading.Lock()  # guards stats
        self._ready = threading.Condition()  # guards everything below
        self._clients: dict[str, deque[_Job]] = {}  # in round-robin order: jobs with items not yet batched
        self._waiting = 0  # items not yet batched, all clients
        self._parsing = threading.BoundedSemaphore(self.limits.max_parsing)
        self._client_waiting: dict[str, int] = defaultdict(int)
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="sarm-batcher", daemon=True)
        self._worker.start()

    # --- handler side ---
    def parse(self, raw: bytes, deadline: float) -> tuple[list[tuple], Options]:
        """(items, options) of a request body, decoded when one of the max_parsing turns is free."""
        if not self._parsing.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise BadRequest(
                f"no turn to decode the body within --request-timeout ({self.limits.request_timeout:g} s): the server is busy",
                503,
            )
        try:
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, nesting
                raise BadRequest(f"the body is not valid JSON ({str(e)[:200]})") from None
            return parse_request(body, self.limits)
        finally:
            self._parsing.release()

    def encode(self, items: list, deadline: float) -> list:
        """Token ids of a request's items (in the calling handler thread), as `RewardModel.encode`/`encode_texts`."""
        encoded = []
        for item in items:
            if time.monotonic() > deadline:
                raise BadRequest(
                    f"not tokenised within --request-timeout ({self.limits.request_timeout:g} s): the server is busy", 503
                )
            if item[0] == "text":
                if not self.model.scores_rendered_texts:
                    raise BadRequest(f'"query": {self.model_kind} needs the prompt located: send "prompts" and "responses"')
                encoded += self.model.encode_texts([item[1]])
            else:
                encoded += self.model.encode([item[1]], [item[2]])
        return encoded

    def score(self, items: list, options: Options = Options(), client: str = "", deadline: float | None = None) -> dict:
        """Score one request's items, blocking until all are scored or `deadline` (time.monotonic) passes."""
        deadline = deadline if deadline is not None else time.monotonic() + self.limits.request_timeout
        self.admit(client, len(items))
        return self.score_encoded(self.encode(items, deadline), options, client, deadline)

    def score_encoded(self, encoded: list, options: Options, client: str, deadline: float) -> dict:
        """Queue tokenised items and wait for their rewards (503 if `deadline` passes first)."""
        if options.top_k and not self.model.linear_head:
            raise BadRequest(f'"return_attributions": {self.model_kind} is no sum of per-feature contributions')
        if options.token_rewards and not self.model.gives_token_rewards:
            raise BadRequest(f'"token_rewards": {self.model_kind} gives no per-token rewards')
        top_k = min(options.top_k, self.model.n_features)
        job = _Job(client, encoded, top_k, options.token_rewards)
        self._submit(job)
        if not job.done.wait(timeout=max(0.0, deadline - time.monotonic())):
            self._cancel(job)
            if not job.done.is_set():
                raise BadRequest(
                    f"not scored within --request-timeout ({self.limits.request_timeout:g} s; {job.scored} of "
                    f"{len(job.encoded)} items were): the server is busy, retry later",
                    503,
                )
        if job.error is not None:
            raise job.error
        result = {
            "rewards": job.rewards,
            "truncated": [bool(e.truncated) for e in job.encoded],
            "n_tokens": [len(e.input_ids) for e in job.encoded],
            "max_length": self.max_length,
        }
        if job.top_k:
            result["attributions"] = job.attributions
        if job.token_rewards:
            result["token_rewards"] = job.per_token
        return result

    def admit(self, client: str, n: int) -> None:
        """Refuse (429/503) n more items from `client` now if the queue could not take them (before tokenising
        them; queueing checks again)."""
        with self._ready:
            self._check_room(client, n)

    def _submit(self, job: _Job) -> None:
        with self._ready:
            self._check_room(job.client, len(job.encoded))
            self._clients.setdefault(job.client, deque()).append(job)
            self._waiting += len(job.encoded)
            self._client_waiting[job.client] += len(job.encoded)
            self._ready.notify()

    def _check_room(self, client: str, n: int) -> None:  # under self._ready
        limits = self.limits
        if self._closed:
            raise BadRequest("the server is shutting down", 503)
        waiting = self._client_waiting.get(client, 0)
        if waiting + n > limits.max_client_queue_items:
            raise BadRequest(
                f"{waiting} items from {client or 'you'} already wait; {n} more would pass "
                f"--max-client-queue-items ({limits.max_client_queue_items}): retry when they are scored",
                429,
            )
        if self._waiting + n > limits.max_queue_items:
            raise BadRequest(
                f"{self._waiting} items already wait; {n} more would pass --max-queue-items ({limits.max_queue_items}): retry later",
                503,
            )

    def _cancel(self, job: _Job) -> None:
        """Drop a job's items not yet batched (its client gave up waiting)."""
        with self._ready:
            jobs = self._clients.get(job.client)
            if jobs is not None and job in jobs:
                jobs.remove(job)
                if not jobs:
                    del self._clients[job.client]
                self._unqueue(job.client, len(job.encoded) - job.next)
                job.next = len(job.encoded)

    def _unqueue(self, client: str, n: int) -> None:
        self._waiting -= n
        self._client_waiting[client] -= n
        if not self._client_waiting[client]:
            del self._client_waiting[client]

    def close(self) -> None:
        with self._ready:
            self._closed = True
            for jobs in self._clients.values():
                for job in jobs:
                    job.error = BadRequest("the server is shutting down", 503)
                    job.done.set()
            self._clients.clear()
            self._ready.notify_all()
        self._worker.join(timeout=10)

    # --- worker side ---
    def _next_batch(self) -> list[tuple[_Job, int]] | None:
        """At most max_batch (job, item) pairs, once max_batch items wait or max_wait has passed since the
        first one was seen; None when closed."""
        with self._ready:
            while not self._waiting and not self._closed:
                self._ready.wait()
            deadline = time.monotonic() + self.max_wait
            while self._waiting < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            if self._closed:
                return None
            batch = []
            while len(batch) < self.max_batch and self._clients:
                client = next(iter(self._clients))
                jobs = self._clients.pop(client)  # re-inserted at the end: the next item is another client's
                job = jobs[0]
                batch.append((job, job.next))
                job.next += 1
                self._unqueue(client, 1)
                if job.next == len(job.encoded):
                    jobs.popleft()
                else:
                    jobs.rotate(-1)  # this client's next item comes from its next request
                if jobs:
                    self._clients[client] = jobs
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:  # the items seen were cancelled meanwhile
                continue
            try:
                self._run(batch)
            except BaseException as e:  # a failed batch answers its requests with 500; the worker goes on
                log.exception("batch of %d items failed", len(batch))
                for job, _ in batch:
                    self._fail(job, e)

    def _fail(self, job: _Job, error: BaseException) -> None:
        if job.error is None:
            job.error = error
        self._cancel(job)
        job.done.set()

    @torch.no_grad()
    def _run(self, batch: list[tuple[_Job, int]]) -> None:
        model = self.model
        encoded = [job.encoded[i] for job, i in batch]
        top_k = max(job.top_k for job, _ in batch)
        if model.linear_head:  # the features are kept for the attributions
            features = model.features(model.hidden_encoded(encoded, self.max_batch))
            rewards = (features @ model.weight).tolist()
        else:
            rewards = model.score_encoded(encoded, self.max_batch).tolist()
        if top_k:
            contributions = model.contributions(features)
            top = contributions.abs().topk(top_k, dim=1).indices
        # the states at every response token: a second forward, of the items that ask for them only
        wanted = [row for row, (job, _) in enumerate(batch) if job.token_rewards]
        per_token = dict(zip(wanted, per_token_rewards(model, [encoded[row] for row in wanted], self.max_batch)))
        finished = 0
        for row, (job, i) in enumerate(batch):
            if job.done.is_set():
                continue
            if not math.isfinite(rewards[row]):
                self._fail(job, RuntimeError(f"the reward of item {i} is not finite ({rewards[row]})"))
                continue
            job.rewards[i] = rewards[row]
            if job.top_k:
                job.attributions[i] = [
                    {
                        "feature": int(f),
                        "contribution": float(contributions[row, f]),
                        "activation": float(features[row, f]),
                        "weight": float(model.weight[f]),
                    }
                    for f in top[row, : job.top_k].tolist()
                ]
            if job.token_rewards:
                if not np.isfinite(per_token[row].rewards).all():
                    self._fail(job, RuntimeError(f"a token reward of item {i} is not finite"))
                    continue
                job.per_token[i] = per_token[row].to_dict(dense=True)
            job.scored += 1
            if job.scored == len(job.encoded):
                finished += 1
                job.done.set()
        with self._lock:
            self.stats["requests"] += finished
            self.stats["sequences"] += len(encoded)
            self.stats["batches"] += 1
            self.stats["forwards"] += 1
            self.stats["truncated"] += sum(e.truncated for e in encoded)

    def count_refusal(self, status: int) -> None:
        with self._lock:
            self.stats["refused"][str(status)] = self.stats["refused"].get(str(status), 0) + 1

    def describe(self) -> dict:
        base = self.model.config["base_model"]
        return {
            "status": "ok",
            "format": self.model.config["format"],
            "features": self.model.config["features"],
            "n_features": self.model.n_features,
            "base_model": base.get("hub_id") or base["name"],
            "layer": base["layer"],
            "max_length": self.max_length,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000,
            "limits": asdict(self.limits),
        }


# --------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------


class _Idle(Exception):
    """Nothing arrived for idle_timeout while waiting for a request: close quietly."""


class _Late(Exception):
    """The request did not fully arrive within read_timeout (or stalled for idle_timeout): 408."""


class _Reader:
    """The handler's rfile: a buffered socket reader in which no read waits more than `idle` seconds for a
    byte, nor past `deadline` (time.monotonic; None between requests)."""

    def __init__(self, sock: socket.socket, idle: float):
        self.sock, self.idle, self.deadline, self.buffer = sock, idle, None, bytearray()

    def _fill(self) -> bool:
        timeout = self.idle
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise _Late("the request did not arrive within --read-timeout")
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            if self.deadline is None:
                raise _Idle from None
            raise _Late("the request stalled (--idle-timeout) or did not arrive within --read-timeout") from None
        self.buffer += data
        return bool(data)

    def wait_for_request(self) -> bool:
        """Wait (up to idle) for the first byte of the next request; False at end of stream."""
        return bool(self.buffer) or self._fill()

    def _take(self, n: int) -> bytes:
        with memoryview(self.buffer) as view:
            out = bytes(view[:n])
        del self.buffer[:n]
        return out

    def readline(self, limit: int = -1) -> bytes:
        start = 0
        while True:
            i = self.buffer.find(b"\n", start)
            if i >= 0 and (limit < 0 or i < limit):
                return self._take(i + 1)
            if 0 <= limit <= len(self.buffer):
                return self._take(limit)
            start = len(self.buffer)
            if not self._fill():
                return self._take(len(self.buffer))

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                break
        return self._take(n)

    def close(self) -> None:
        self.buffer = bytearray()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sarm-serve"
    service: RewardService  # set on the subclass made by make_server
    limits: Limits

    def setup(self):
        super().setup()
        self.rfile = _Reader(self.connection, self.limits.idle_timeout)
        self.unread = False  # a refused request whose body may still be coming

    def handle(self):
        super().handle()
        if self.unread:
            self._linger()

    def _linger(self) -> None:
        """Half-close, then read and drop what the client still sends (at most LINGER_SECONDS and 4 bodies'
        worth) before closing: a client that sends its whole body before reading gets the refusal rather than
        a connection reset."""
        budget, end = 4 * self.limits.max_body_bytes, time.monotonic() + LINGER_SECONDS
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while budget > 0 and time.monotonic() < end:
                self.connection.settimeout(min(self.limits.idle_timeout, end - time.monotonic()))
                data = self.connection.recv(1 << 16)
                if not data:
                    break
                budget -= len(data)
        except (OSError, ValueError):
            pass

    def handle_one_request(self):
        self.rfile.deadline = None
        try:
            if not self.rfile.wait_for_request():
                self.close_connection = True
                return
        except (_Idle, OSError):
            self.close_connection = True
            return
        self.rfile.deadline = time.monotonic() + self.limits.read_timeout
        self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
        try:
            super().handle_one_request()
        except _Late as e:
            self._error(408, str(e), close=True)
        except OSError:  # the client went away, or does not read its answer
            self.close_connection = True

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        self.connection.settimeout(self.limits.idle_timeout)  # a client that does not read its answer is dropped
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _error(self, status: int, message: str, close: bool = False) -> None:
        """Answer {"error": message}; `close`: the request's body was not read, close the connection after."""
        self.service.count_refusal(status)
        if close:
            self.close_connection = self.unread = True
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        self._send(status, {"error": message}, headers)

    def send_error(self, code, message=None, explain=None):  # http.server's own errors, as JSON
        self._error(int(code), message or explain or HTTPStatus(code).phrase, close=True)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._send(200, self.service.describe())
        elif self.path == "/stats":
            with self.service._lock:
                stats = json.loads(json.dumps(self.service.stats))
            self._send(200, stats)
        else:
            self._error(404, f"no such path {self.path!r}: POST /get_reward, GET /health, GET /stats")

    def _content_length(self) -> int:
        """The body's length from the headers; raises BadRequest (the connection is then closed)."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") is not None:
            if lengths:
                raise BadRequest("both Transfer-Encoding and Content-Length: send only a Content-Length")
            raise BadRequest("chunked transfer encoding is not read: send a Content-Length", 411)
        if not lengths:
            raise BadRequest("a Content-Length header is required", 411)
        if len(set(v.strip() for v in lengths)) > 1:
            raise BadRequest(f"{len(lengths)} different Content-Length headers")
        value = lengths[0].strip()
        if not (value.isascii() and value.isdigit()):
            raise BadRequest(f"Content-Length must be a non-negative integer, got {value[:40]!r}")
        if len(value) > 18 or int(value) > self.limits.max_body_bytes:
            raise BadRequest(
                f"the body has {value[:40]} bytes, more than the {self.limits.max_body_bytes} allowed (--max-body-mb)", 413
            )
        return int(value)

    def do_POST(self):  # noqa: N802
        try:
            length = self._content_length()
        except BadRequest as e:
            return self._error(e.status, str(e), close=True)
        if self.path != "/get_reward":
            return self._error(404, f"no such path {self.path!r}: POST /get_reward", close=True)
        try:
            raw = self.rfile.read(length)
        except _Late as e:
            return self._error(408, str(e), close=True)
        if len(raw) < length:
            return self._error(400, f"the body ended after {len(raw)} of its {length} bytes", close=True)
        deadline = time.monotonic() + self.limits.request_timeout
        client, service = self.client_address[0], self.service
        try:
            items, options = service.parse(raw, deadline)
            del raw
            service.admit(client, len(items))
            encoded = service.encode(items, deadline)
            del items  # a waiting request holds token ids only
            result = service.score_encoded(encoded, options, client, deadline)
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
    block_on_close = False  # server_close does not wait for connections still open
    request_queue_size = 256  # the listen backlog (socketserver's default of 5 resets bursts of clients)
    limits: Limits
    service: RewardService

    def server_activate(self):
        super().server_activate()
        self._open = 0
        self._open_from: dict[str, int] = defaultdict(int)
        self._count_lock = threading.Lock()

    def process_request(self, request, client_address):
        """Start a handler thread, unless the connection limits are reached: then answer 503/429 at once."""
        client = client_address[0]
        with self._count_lock:
            if self._open >= self.limits.max_connections:
                refusal = 503, f"{self._open} connections are open, the most allowed (--max-connections): retry later"
            elif self._open_from[client] >= self.limits.max_client_connections:
                refusal = (
                    429,
                    f"{self._open_from[client]} connections from {client} are open, the most allowed (--max-client-connections)",
                )
            else:
                refusal = None
                self._open += 1
                self._open_from[client] += 1
        if refusal is not None:
            self._refuse(request, *refusal)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed(client)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed(client_address[0])

    def _closed(self, client: str) -> None:
        with self._count_lock:
            self._open -= 1
            self._open_from[client] -= 1
            if not self._open_from[client]:
                del self._open_from[client]

    def _refuse(self, request, status: int, message: str) -> None:
        """Answer without a thread (the accept loop must not wait on this client) and close."""
        self.service.count_refusal(status)
        data = json.dumps({"error": message}).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            request.setblocking(False)
            try:
                for _ in range(16):  # what the client has sent so far (bounded), so that closing does not reset
                    if not request.recv(1 << 16):
                        break
            except (BlockingIOError, InterruptedError):
                pass
            request.send(head + data)
        except OSError:
            pass
        self.shutdown_request(request)


def make_server(
    model, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, max_wait_ms: float = 5.0, limits: Limits | None = None
) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer serving `model` (port 0: a free port; see `server.server_address`). Run it with
    `serve_forever()`; `shutdown()`, `server_close()` then `server.service.close()` stop it."""
    limits = limits or Limits()
    service = RewardService(model, max_batch, max_wait_ms, limits)
    handler = type("Handler", (_Handler,), {"service": service, "limits": limits})
    server = _Server((host, port), handler, bind_and_activate=False)
    server.limits, server.service = limits, service
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        service.close()
        raise
    return server


LIMIT_FLAGS = {  # flag: (Limits field, type, help)
    "--max-items": ("max_items", int, "texts per request (more: 413)"),
    "--max-text-chars": ("max_text_chars", int, "characters per text, checked before tokenising (more: 413)"),
    "--max-body-mb": ("max_body_bytes", float, "request body size in MiB (more: 413, not read)"),
    "--request-timeout": ("request_timeout", float, "seconds to answer a request once it has arrived (then 503)"),
    "--read-timeout": ("read_timeout", float, "seconds for a whole request to arrive after its first byte (then 408)"),
    "--idle-timeout": ("idle_timeout", float, "seconds a connection may stay silent (then closed)"),
    "--max-connections": ("max_connections", int, "open connections, one handler thread each (more: 503)"),
    "--max-client-connections": ("max_client_connections", int, "open connections from one address (more: 429)"),
    "--max-queue-items": ("max_queue_items", int, "items waiting to be scored, all clients (more: 503)"),
    "--max-client-queue-items": ("max_client_queue_items", int, "items waiting from one address (more: 429)"),
    "--max-parsing": ("max_parsing", int, "request bodies decoded from JSON at once (the rest wait)"),
}


def limits_from_args(args) -> Limits:
    values = {}
    for flag, (name, _, _) in LIMIT_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        values[name] = int(value * 2**20) if name == "max_body_bytes" else value
    return Limits(**values)


def _serve(args) -> None:
    from sarm.reward_model import load_base_head

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = limits_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_base_head(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    model.load_backbone(model.device)
    try:
        server = make_server(model, args.host, args.port, args.max_batch, args.max_wait_ms, limits)
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
    from sarm.cli import add_trust_remote_code

    serve = subparsers.add_parser("serve", help="serve a reward model over HTTP (OpenRLHF-compatible POST /get_reward)")
    serve.add_argument("--model", required=True, help="a reward model folder, e.g. results/reward/sarm")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--max-batch", type=int, default=16, help="sequences per forward pass")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    serve.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_trust_remote_code(serve)
    defaults = Limits()
    for flag, (name, kind, help_text) in LIMIT_FLAGS.items():
        default = getattr(defaults, name)
        default = default / 2**20 if name == "max_body_bytes" else default
        serve.add_argument(flag, type=kind, default=default, help=f"{help_text}; default {default:g}")
    serve.set_defaults(func=_serve)


if __name__ == "__main__":  # python -m sarm.serve ...
    from sarm.cli import main

    main(["serve", *sys.argv[1:]])
