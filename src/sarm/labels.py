"""Automatic feature labels through a pluggable judge, as in the paper (the top 40 contexts of a feature go to
an LLM, which answers a short label and a 1-5 monosemanticity score).

A judge is a callable `judge(messages, attempt) -> str` with a `name`: `EndpointJudge` posts to an
OpenAI-compatible `/chat/completions` endpoint over plain HTTP; `LocalJudge` (the offline default) runs a
local instruct model with transformers' `generate`. `label_features` asks once per feature, retries on a
failure or an answer it cannot parse, then marks the feature unlabelled and goes on. Answers are kept in a
JSON cache keyed by the judge and the exact prompt, so a re-run does not ask again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from sarm import models
from sarm.errors import SarmError

log = logging.getLogger(__name__)

SYSTEM = "You interpret the features of a sparse autoencoder trained on a language model's hidden states."
INSTRUCTION = (
    "Below are text excerpts where one feature is most active; the token where it fires is marked [[like this]] "
    "(⟨end⟩ marks the end of an assistant response). What do the excerpts have in common?\n"
    "Answer in exactly two lines:\n"
    "Label: <a short description of the concept, at most 8 words>\n"
    "Score: <1-5: how monosemantic the feature is; 5 = every excerpt shows the same clear concept, "
    "1 = no common concept>"
)
# the local judge's answer starts here, which keeps a small model on format; the lead-in is then cut
PREFILL, LEAD_IN = "Label:", " The excerpts are all about"
MAX_LABEL_CHARS = 80
# answers that copy the excerpts' markup, the instruction's placeholders or a list number are not labels
ECHO = re.compile(r"\[\[|⏎|⟨end⟩|<[^>]*>|monosemantic|excerpt|common concept|^\W*\d+\s*[-.:)\]]|^\[", re.I)
VACUOUS = re.compile(r"(the |a )?(same|similar|different|features?|concepts?|nothing|none|n/?a)\b", re.I)
SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>|</?s>")


def build_prompt(card: dict, n_contexts: int = 40) -> list[dict]:
    """Chat messages asking for a label of one feature card (see sarm.explain.feature_stats): its top
    corpus contexts, then the evaluation-set response ends, `n_contexts` in all."""
    lines = [f"…{c['left']}[[{c['token'].strip() or c['token']}]]{c['right']}…" for c in card.get("corpus_contexts", [])]
    lines += [f"…{c['response_end']} [[⟨end⟩]]" for c in card.get("eval_contexts", [])]
    # chat-template markup inside an excerpt would read as the judge's own special tokens
    lines = [re.sub(r"\s+", " ", SPECIAL.sub(" ", text)).replace("… ", "…").strip() for text in lines[:n_contexts]]
    if not lines:
        raise SarmError(f"feature {card.get('feature')}: no context fires it, nothing to label")
    excerpts = "\n".join(f"{i}. {text}" for i, text in enumerate(lines, 1))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{INSTRUCTION}\n\nExcerpts:\n{excerpts}"},
    ]


def _clean_label(value) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip().splitlines()[0] if value.strip() else ""
    text = re.split(r"(?<=\w)[.!?](?:\s|$)", text)[0]  # the first sentence
    text = re.sub(r"\s+", " ", text).strip(" \t*_`'\"“”.:;-")
    if len(text) > MAX_LABEL_CHARS:
        text = text[:MAX_LABEL_CHARS].rsplit(" ", 1)[0]
    if sum(ch.isalpha() for ch in text) < 2 or ECHO.search(text) or VACUOUS.match(text):
        return None
    return text


def _clean_score(value) -> int | None:
    try:
        score = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return score if 1 <= score <= 5 else None


def parse_answer(text) -> dict | None:
    """{label, score} from a judge's answer: a JSON object with `label` (and `score`), or `Label: …` and
    `Score: n` lines. The score is None when missing or outside 1-5; None when there is no usable label."""
    if not isinstance(text, str) or not text.strip():
        return None
    label = score = None
    match = re.search(r"\{.*\}", text, re.S)
    if match:
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            label, score = obj.get("label"), obj.get("score")
    if label is None:
        found = re.search(r"(?im)^[\s*#]*label[\s*]*[:=]\s*(.*)$", text)
        if found:
            label = found.group(1)
            number = re.search(r"(?i)score[\s*]*[:=]\s*\**\s*(\d+)", text)
            score = number.group(1) if number else None
    label = _clean_label(label)
    return {"label": label, "score": _clean_score(score)} if label else None


# --------------------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------------------


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect with every header of the request, the API key too, to whatever origin the
    answer names (and turns a POST into a GET): the judge follows none, and says where it was sent."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise SarmError(
            f"config key explain.labels.endpoint.base_url: {req.full_url} answered {code} redirecting to {newurl}; "
            "redirects are not followed (the API key would go with them): give the endpoint's final URL"
        )


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class EndpointJudge:
    """An OpenAI-compatible chat endpoint: POST {base_url}/chat/completions; the key, if any, comes from the
    environment variable `api_key_env`. Redirects are refused; plain http is for a local endpoint only (warned
    otherwise: the key and the excerpts would cross the network in clear)."""

    def __init__(
        self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 60, max_tokens: int = 60
    ):
        if not base_url:
            raise SarmError("config key explain.labels.endpoint.base_url: give the endpoint's URL for judge 'openai'")
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SarmError(f"config key explain.labels.endpoint.base_url: {base_url!r} is not an http(s) URL")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            log.warning(
                "config key explain.labels.endpoint.base_url: %s is plain http to another machine; the API key "
                "and the excerpts travel unencrypted (use https)",
                base_url,
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_tokens = model, timeout_s, max_tokens
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.name = f"openai:{base_url}:{model}"
        self._opener = urllib.request.build_opener(_RefuseRedirects)

    def __call__(self, messages: list[dict], attempt: int = 0) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": 0.0 if attempt == 0 else 0.7,
                "max_tokens": self.max_tokens,
            }
        )
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
        with self._opener.open(request, timeout=self.timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return reply["choices"][0]["message"]["content"]


class LocalJudge:
    """A local instruct model (the offline default): greedy on the first attempt, sampled on retries. The
    assistant turn is prefilled with `Label:`."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        max_new_tokens: int = 24,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        self.device = models.resolve_device(device)
        self.tokenizer = models.load_tokenizer(path, chat_template, trust_remote_code)
        dtype = models.resolve_dtype("auto", self.device)  # bf16 where native: several times faster on such CPUs
        self.model = (
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        )
        self.max_new_tokens = max_new_tokens
        self.name = f"local:{Path(path).name}:{max_new_tokens}"

    def __call__(self, messages: list[dict], attempt: int = 0) -> str:
        return self.many([messages], attempt)[0]

    @torch.no_grad()
    def many(self, batch: list[list[dict]], attempt: int = 0) -> list[str]:
        """Answers to several prompts in one left-padded `generate` call."""
        texts = [
            self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + PREFILL + LEAD_IN for m in batch
        ]
        self.tokenizer.padding_side = "left"
        inputs = self.tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=True).to(self.device)
        sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95} if attempt else {"do_sample": False}
        torch.manual_seed(attempt)
        out = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling
        )
        return [PREFILL + self.tokenizer.decode(row, skip_special_tokens=True) for row in out[:, inputs["input_ids"].shape[1] :]]


def make_judge(settings: dict, model_dir: str | Path, device: str = "cpu", chat_template: str | None = None) -> Callable | None:
    """The judge the config names (`explain.labels.judge`): openai, local or none."""
    kind = settings["judge"]
    if kind == "none":
        return None
    if kind == "openai":
        endpoint = settings["endpoint"]
        return EndpointJudge(endpoint["base_url"], endpoint["model"], endpoint["api_key_env"], endpoint["timeout_s"])
    if kind == "local":
        return LocalJudge(settings.get("local_model") or model_dir, device, settings["max_new_tokens"], chat_template)
    raise SarmError(f"config key explain.labels.judge: unknown judge {kind!r} (local, openai or none)")


# --------------------------------------------------------------------------------------------------------
# The cache and the labelling loop
# --------------------------------------------------------------------------------------------------------


class LabelCache:
    """A JSON file: sha256(judge name + prompt) -> {label, score, judge}. Only parsed answers are kept, so a
    feature left unlabelled is asked again next time."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        if self.path and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise SarmError(
                    f"{self.path}: the label cache is not valid JSON ({err.msg}); delete it to start afresh"
                ) from None

    @staticmethod
    def key(judge_name: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps({"judge": judge_name, "messages": messages}, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries, indent=1, ensure_ascii=False))
            os.replace(tmp, self.path)


JUDGE_ERRORS = (
    urllib.error.URLError,
    TimeoutError,
    ConnectionError,
    OSError,
    json.JSONDecodeError,
    KeyError,
    IndexError,
    TypeError,
    UnicodeDecodeError,
)


def _answers(judge: Callable, batch: list[list[dict]], attempt: int) -> list:
    """The judge's raw answers to a batch (its `many` if it has one), an exception standing for a failed call."""
    if hasattr(judge, "many"):
        try:
            return judge.many(batch, attempt)
        except JUDGE_ERRORS as err:
            return [err] * len(batch)
    out = []
    for messages in batch:
        try:
            out.append(judge(messages, attempt))
        except JUDGE_ERRORS as err:
            out.append(err)
    return out


def ask(
    judge: Callable, prompts: dict[str, list[dict]], retries: int = 2, backoff_s: float = 1.0, sleep=time.sleep
) -> dict[str, tuple[dict | None, list[str]]]:
    """Ask `judge` each prompt until it gives a parsable answer, at most 1 + `retries` times:
    {name: (answer or None, problems)}. A failed call or an unparsable answer counts as one attempt."""
    result = {name: (None, []) for name in prompts}
    pending = list(prompts)
    for attempt in range(retries + 1):
        if not pending:
            break
        if attempt:
            sleep(backoff_s * 2 ** (attempt - 1))
        for name, raw in zip(pending, _answers(judge, [prompts[n] for n in pending], attempt)):
            problems = result[name][1]
            if isinstance(raw, BaseException):
                first = str(raw).strip().splitlines()
                problems.append(f"attempt {attempt + 1}: {type(raw).__name__}{': ' + first[0] if first else ''}")
                continue
            answer = parse_answer(raw)
            if answer:
                result[name] = (answer, problems)
            else:
                problems.append(f"attempt {attempt + 1}: no usable label in {str(raw)[:60]!r}")
        pending = [name for name in pending if result[name][0] is None]
    return result


def label_features(
    cards: list[dict],
    judge: Callable | None,
    cache: LabelCache,
    n_features: int = 8,
    n_contexts: int = 40,
    retries: int = 2,
    backoff_s: float = 1.0,
    sleep=time.sleep,
) -> dict[str, dict]:
    """Labels of the first `n_features` cards: {feature (str): {label, score, status, judge}}; status is
    `labelled`, `cached` or `unlabelled` (with `problems`). The run goes on whatever the judge does."""
    out, prompts = {}, {}
    for card in cards[:n_features]:
        feature = str(card["feature"])
        if judge is None:
            out[feature] = {
                "label": None,
                "score": None,
                "status": "unlabelled",
                "problems": ["no judge (explain.labels.judge: none)"],
            }
            continue
        try:
            messages = build_prompt(card, n_contexts)
        except SarmError as err:
            log.warning("%s", err)
            out[feature] = {"label": None, "score": None, "status": "unlabelled", "problems": [str(err)], "judge": judge.name}
            continue
        cached = cache.get(LabelCache.key(judge.name, messages))
        if cached:
            out[feature] = {**cached, "status": "cached"}
        else:
            out[feature] = None  # keeps the cards' order
            prompts[feature] = messages
    if prompts:
        for feature, (answer, problems) in ask(judge, prompts, retries, backoff_s, sleep).items():
            if answer is None:
                log.warning("feature %s: unlabelled after %d attempts (%s); going on", feature, retries + 1, "; ".join(problems))
                out[feature] = {"label": None, "score": None, "status": "unlabelled", "problems": problems, "judge": judge.name}
                continue
            entry = {**answer, "judge": judge.name}
            cache.put(LabelCache.key(judge.name, prompts[feature]), entry)
            out[feature] = {**entry, "status": "labelled"}
            log.info("feature %s: %r (score %s)", feature, answer["label"], answer["score"])
    counts = {s: sum(v["status"] == s for v in out.values()) for s in ("labelled", "cached", "unlabelled")}
    log.info(
        "labels: %d asked and labelled, %d from the cache, %d unlabelled",
        counts["labelled"],
        counts["cached"],
        counts["unlabelled"],
    )
    return out
