"""The reward server over loopback, with a real HTTP client, on the tiny SARM."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sarm.activations import render
from sarm.reward import RewardModel
from sarm.serve import make_server


@pytest.fixture(scope="module")
def model(trained):
    root, _, _ = trained
    model = RewardModel.from_pretrained(root / "rm")
    model.load_backbone()
    return model


def start(model, **kwargs):
    server = make_server(model, "127.0.0.1", 0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def url(model):
    server, url = start(model, max_batch=16, max_wait_ms=2)
    yield url
    server.shutdown()
    server.server_close()
    server.service.close()


def post(url, body, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/get_reward", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, path):
    with urllib.request.urlopen(f"{url}{path}", timeout=60) as response:
        return json.loads(response.read())


def test_rewards_equal_the_package_for_every_request_form(url, model, trained):
    _, val_pairs, _ = trained
    prompts, responses = list(val_pairs.prompt), list(val_pairs.chosen)
    expected = model.score(prompts, responses)
    assert np.abs(expected).max() > 0
    status, out = post(url, {"prompts": prompts, "responses": responses})
    assert status == 200 and len(out["rewards"]) == len(prompts)
    np.testing.assert_allclose(out["rewards"], expected, atol=1e-5, rtol=0)
    # OpenRLHF: full chat-templated texts, with or without the final end-of-turn token, padded or not
    texts = [render(model._tokenizer, p, r) for p, r in zip(prompts, responses)]
    queries = [texts[0], texts[1].removesuffix("<|im_end|>"), texts[2] + "<|im_end|>" * 3 + "\n", *texts[3:]]
    status, out = post(url, {"query": queries, "prompts": ["ignored"], "labels": None})
    assert status == 200
    np.testing.assert_allclose(out["rewards"], expected, atol=1e-5, rtol=0)
    conversations = [[*p, {"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    status, out = post(url, {"messages": conversations})
    np.testing.assert_allclose(out["rewards"], expected, atol=1e-5, rtol=0)
    assert out["max_length"] == 96 and len(out["n_tokens"]) == len(prompts)


def test_attributions_are_the_largest_contributions_and_sum_to_the_reward(url, model):
    status, out = post(url, {"prompts": ["How do I boil an egg?"], "responses": ["Boil it 8 minutes."], "return_attributions": 8})
    assert status == 200
    top = out["attributions"][0]
    magnitudes = [abs(t["contribution"]) for t in top]
    assert len(top) == 8 and magnitudes == sorted(magnitudes, reverse=True)
    for t in top:
        assert t["contribution"] == pytest.approx(t["activation"] * t["weight"], rel=1e-5)
        assert t["weight"] == pytest.approx(float(model.weight[t["feature"]]))
    # the tiny SAE has k = 8 active latents: the 8 largest contributions are all of them
    assert sum(t["contribution"] for t in top) == pytest.approx(out["rewards"][0], abs=1e-4)
    assert "attributions" not in post(url, {"query": ["x"]})[1]


def test_over_long_text_is_truncated_and_reported(url, model):
    long = "Tell me everything about the sea. " * 60
    status, out = post(url, {"prompts": [long, "Hi"], "responses": ["Waves.", "Hello."]})
    assert status == 200 and out["truncated"] == [True, False]
    assert out["n_tokens"][0] == 96 > out["n_tokens"][1]
    assert out["rewards"][0] == pytest.approx(float(model.score([long], ["Waves."])[0]), abs=1e-5)


@pytest.mark.parametrize(
    "body, raw, status, message",
    [
        (None, b"{not json", 400, "the body is not valid JSON"),
        ([1, 2], None, 400, "the body must be a JSON object"),
        ({"query": "one text"}, None, 400, '"query" must be a list, got str'),
        ({"query": []}, None, 400, '"query" is an empty list'),
        ({"query": ["ok", 3]}, None, 400, "query[1] must be a string, got int"),
        ({"prompts": ["a", "b"], "responses": ["x"]}, None, 400, "2 prompts but 1 responses"),
        ({"messages": [[{"role": "user", "content": "hi"}]]}, None, 400, "must end in the assistant turn"),
        ({"query": ["x"], "return_attributions": "all"}, None, 400, '"return_attributions" must be a non-negative integer'),
        ({"texts": ["x"]}, None, 400, "expected one of {\"query\""),
    ],
)
def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(url, body, raw, status, message):
    code, out = post(url, body, raw)
    assert code == status and message in out["error"]
    code, out = post(url, {"query": ["still here?"]})
    assert code == 200 and len(out["rewards"]) == 1


def test_unknown_path_is_a_404(url):
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{url}/nope", timeout=60)
    assert error.value.code == 404 and "POST /get_reward" in json.loads(error.value.read())["error"]
    assert get(url, "/health")["features"] == "sae"


def test_concurrent_requests_are_batched(model, trained):
    _, val_pairs, _ = trained
    prompts, responses = list(val_pairs.prompt)[:4] * 2, list(val_pairs.rejected)[:4] * 2
    # max_batch 4 and a long wait: 8 concurrent one-sequence requests make exactly two full batches
    server, url = start(model, max_batch=4, max_wait_ms=5000)
    try:
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: post(url, {"prompts": [prompts[i]], "responses": [responses[i]]}), range(8)))
        stats = get(url, "/stats")
    finally:
        server.shutdown()
        server.server_close()
        server.service.close()
    assert all(code == 200 for code, _ in outs)
    assert stats["requests"] == stats["sequences"] == 8 and stats["batches"] == 2 and stats["forwards"] == 2
    np.testing.assert_allclose([out["rewards"][0] for _, out in outs], model.score(prompts, responses), atol=1e-5, rtol=0)


def test_cli_serves(trained):
    root, _, _ = trained
    process = subprocess.Popen(
        [sys.executable, "-m", "sarm.cli", "serve", "--model", str(root / "rm"), "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].strip().removesuffix("/get_reward")
        code, out = post(url, {"prompts": ["Hi"], "responses": ["Hello."]})
        assert code == 200
        assert out["rewards"][0] == pytest.approx(float(RewardModel.from_pretrained(root / "rm").score(["Hi"], ["Hello."])[0]), abs=1e-5)
    finally:
        process.terminate()
        process.wait(timeout=30)
