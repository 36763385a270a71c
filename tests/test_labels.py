"""sarm.labels' endpoint judge against real local HTTP servers: its API key never leaves the endpoint's origin."""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from sarm import labels as L
from sarm.errors import SarmError

KEY = "sk-judge-0123456789"
ANSWER = {"choices": [{"message": {"content": "Label: stolen answer\nScore: 5"}}]}


@contextmanager
def server(answer):
    """A local HTTP server on a free port; `answer(handler)` writes each response. Yields (url, requests seen)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append(
                {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)}
            )
            answer(self)

        do_GET = do_POST = _any

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def reply_json(handler):
    body = json.dumps(ANSWER).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_never_carries_the_api_key_to_another_origin(monkeypatch, code):
    """A 302 from the endpoint made urllib re-send `Authorization: Bearer <key>` to the other origin, and the
    judge took that origin's answer as the label."""
    monkeypatch.setenv("SARM_TEST_JUDGE_KEY", KEY)
    with server(reply_json) as (elsewhere, stolen):

        def redirect(handler):
            handler.send_response(code)
            handler.send_header("Location", f"{elsewhere}/collect")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with server(redirect) as (endpoint, asked):
            judge = L.EndpointJudge(f"{endpoint}/v1", "judge-1", "SARM_TEST_JUDGE_KEY", timeout_s=10)
            with pytest.raises(
                SarmError,
                match=rf"^config key explain.labels.endpoint.base_url: .* answered {code} redirecting to {elsewhere}/collect",
            ):
                judge([{"role": "user", "content": "hi"}])
            # the labelling loop stops on it (a configuration error), rather than retrying into `unlabelled`
            card = {"feature": 3, "corpus_contexts": [{"left": "an excerpt ", "token": "here", "right": "."}]}
            with pytest.raises(SarmError, match="redirects are not followed"):
                L.label_features([card], judge, L.LabelCache(None), n_features=1, retries=2, backoff_s=0)
    assert len(asked) == 2 and asked[0]["headers"]["Authorization"] == f"Bearer {KEY}"  # the endpoint itself
    assert stolen == []


def test_the_endpoint_itself_still_answers(monkeypatch):
    monkeypatch.setenv("SARM_TEST_JUDGE_KEY", KEY)
    with server(reply_json) as (endpoint, asked):
        answer = L.EndpointJudge(f"{endpoint}/v1", "judge-1", "SARM_TEST_JUDGE_KEY", timeout_s=10)(
            [{"role": "user", "content": "hi"}]
        )
    assert answer == ANSWER["choices"][0]["message"]["content"] and asked[0]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(
    "url, warned",
    [
        ("http://judge.example.org/v1", True),
        ("http://10.0.0.7:8000/v1", True),
        ("https://api.example.org/v1", False),
        ("http://127.0.0.1:8000/v1", False),
        ("http://localhost:8000/v1", False),
        ("http://[::1]:8000/v1", False),
    ],
)
def test_plain_http_to_another_machine_is_warned(caplog, url, warned):
    with caplog.at_level(logging.WARNING, logger="sarm.labels"):
        L.EndpointJudge(url, "judge-1", None)
    assert ("plain http to another machine" in caplog.text) == warned


def test_an_endpoint_that_is_not_an_http_url_is_refused():
    with pytest.raises(
        SarmError, match=r"^config key explain.labels.endpoint.base_url: 'file:///etc/passwd' is not an http\(s\) URL$"
    ):
        L.EndpointJudge("file:///etc/passwd", "judge-1", None)
