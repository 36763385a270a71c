"""Interpretability on a tiny trained SARM: attributions that add up, contexts recovered from the cache, the
logit lens, feature cards in a real headless browser, labels through a judge, and the preference shift."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_labels import server

from sarm import activations as A
from sarm import explain as X
from sarm import labels as L
from sarm import models
from sarm import shift as S
from sarm.cli import main as cli_main
from sarm.errors import SarmError
from sarm.evaluate import score_cached
from sarm.reward import fit_reward_model
from sarm.reward_model import RewardModel
from sarm.sae import cache_chunks, train_sae


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, hh_pairs, tmp_path_factory):
    """12 real HH pairs cached on the tiny model (sentences too), a small SAE and a head with random weights
    on half the latents (the rest exactly 0). Pairs 0-3 are labelled category `safety`, the rest `chat`."""
    root = tmp_path_factory.mktemp("explain")
    pairs = hh_pairs.assign(category=["safety"] * 4 + ["chat"] * 8, subset=["s1"] * 2 + ["s2"] * 2 + ["c"] * 8)
    tokenizer = models.load_tokenizer(tiny_model_dir)
    backbone = models.load_truncated(tiny_model_dir, 2, torch.float32)
    A.cache_activations(
        backbone, tokenizer, pairs, root / "cache", max_length=96, batch_size=4, shard_size=10, meta={"dtype": "float32"}
    )
    cache = A.ActivationCache(root / "cache")
    sae = train_sae(cache_chunks(cache), 64, 128, 8, 2000, batch_size=64)
    spec = {"name": "tiny", "layer": 2, "dtype": "float32", "max_length": 96}
    model, _ = fit_reward_model(
        {"features": "sae"},
        cache,
        cache,
        tiny_model_dir,
        spec,
        {"epochs": 1, "lr": 0.01, "batch_size": 4, "weight_decay": 0.0},
        sae,
    )
    g = torch.Generator().manual_seed(0)
    model.weight = torch.randn(128, generator=g) * (torch.rand(128, generator=g) < 0.5)
    model.save_pretrained(root / "rm")
    return {
        "root": root,
        "pairs": pairs,
        "cache": cache,
        "model": RewardModel.from_pretrained(root / "rm"),
        "backbone": backbone,
        "tokenizer": tokenizer,
        "model_dir": tiny_model_dir,
    }


# --- attribution ---


def test_contributions_add_up_to_the_reward(tiny):
    model, hidden = tiny["model"], tiny["cache"].final()
    _, contributions, rewards = X.attribute(model, hidden)
    np.testing.assert_allclose(contributions.sum(1).numpy(), model.score_hidden(hidden).numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(rewards, model.score_hidden(hidden))
    for e in X.explain(model, hidden, top=3):
        total = sum(r["contribution"] for r in e["positive"] + e["negative"]) + e["rest"]
        assert total == pytest.approx(e["reward"], abs=1e-5)
        pos, neg = [r["contribution"] for r in e["positive"]], [r["contribution"] for r in e["negative"]]
        assert pos == sorted(pos, reverse=True) and all(c > 0 for c in pos)
        assert neg == sorted(neg) and all(c < 0 for c in neg) and len(pos) <= 3 and len(neg) <= 3
    assert any(e["positive"] and e["negative"] for e in X.explain(model, hidden))


def test_attribution_table_sums_to_the_evaluated_scores(tiny):
    model, cache, pairs = tiny["model"], tiny["cache"], tiny["pairs"]
    table = X.attribution_table(model, cache, pairs)
    scores = score_cached(model, cache, pairs)
    sums = table.groupby("seq")["contribution"].sum()
    np.testing.assert_allclose(sums.to_numpy()[0::2], scores.score_chosen, atol=1e-5)
    np.testing.assert_allclose(sums.to_numpy()[1::2], scores.score_rejected, atol=1e-5)
    assert (table.groupby("seq")["rank"].min() == 1).all()
    first = table[table["rank"] <= 2].groupby("seq")["contribution"].apply(lambda c: abs(c.iloc[0]) >= abs(c.iloc[-1]))
    assert first.all()


def test_cli_explains_one_pair(tiny, capsys):
    model, pairs = tiny["model"], tiny["pairs"]
    prompt, response = pairs.prompt[0][-1]["content"], pairs.chosen[0]
    cli_main(
        [
            "explain",
            "--model",
            str(tiny["root"] / "rm"),
            "--prompt",
            prompt,
            "--response",
            response,
            "--top",
            "4",
            "--json",
            "--feature",
            "3",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["reward"] == pytest.approx(float(model.score([prompt], [response])[0]), abs=1e-5)
    total = sum(r["contribution"] for r in out["positive"] + out["negative"]) + out["rest"]
    assert total == pytest.approx(out["reward"], abs=1e-5)
    assert out["feature"]["feature"] == 3
    cli_main(["explain", "--model", str(tiny["root"] / "rm"), "--prompt", prompt, "--response", response])
    assert capsys.readouterr().out.startswith(f"reward {out['reward']:+.6f}")
    with pytest.raises(SystemExit, match=r"--feature: feature 128 is out of range \(the model has 128 features: 0..127\)"):
        cli_main(["explain", "--model", str(tiny["root"] / "rm"), "--prompt", "p", "--response", "r", "--feature", "128"])


# --- contexts and the logit lens ---


def test_sentence_ordinals_recover_the_cached_vectors(tiny):
    """The corpus keeps no positions: a vector's ordinal within its sequence, re-tokenised, must give back the
    token whose hidden state was cached (checked by running that one sequence again)."""
    cache, pairs, tokenizer = tiny["cache"], tiny["pairs"], tiny["tokenizer"]
    seqs = A.pair_sequences(pairs)
    tensors = load_file(cache.shards[1])  # a later shard: sequence numbers do not start at 0
    s = int(tensors["sent_seq"][len(tensors["sent_seq"]) // 2])
    cached = tensors["sent"][tensors["sent_seq"] == s].float()
    row = seqs.iloc[s]
    enc = A.encode(tokenizer, list(row.prompt), row.response, 96)
    _, (fresh,), _ = A.forward_batch(tiny["backbone"], [enc], tokenizer.pad_token_id, "cpu", True)
    assert len(cached) == len(enc.sentence_ends) > 1
    torch.testing.assert_close(fresh, cached, atol=2e-2, rtol=1e-2)  # cached as float16
    for ordinal in range(len(cached)):
        ctx = X.sentence_context(tokenizer, row.prompt, row.response, ordinal, 96)
        assert ctx["token"].rstrip(" ⏎")[-1:] in A.SENTENCE_END_CHARS or ctx["token"].strip() in ("", "⏎")


def test_logit_lens_is_odd_in_the_direction(tiny):
    d = tiny["model"].sae.W_dec[:2].detach()
    plus, minus = X.logit_lens(tiny["model_dir"], d, n=5), X.logit_lens(tiny["model_dir"], -d, n=5)
    assert len(plus[0]["promoted"]) == 5
    assert plus[0]["promoted"] == minus[0]["suppressed"] and plus[1]["suppressed"] == minus[1]["promoted"]


def test_feature_stats_match_the_cache(tiny):
    model, cache, pairs = tiny["model"], tiny["cache"], tiny["pairs"]
    stats = X.feature_stats(
        model, cache, pairs, cache, pairs, tiny["model_dir"], n_weight=2, n_frequent=2, extra=[5], n_contexts=3, n_tokens=4
    )
    z = model.features(cache.final())
    cards = stats["features"]
    assert [c["why"] for c in cards[:2]] == [["largest |weight|"]] * 2 and cards[-1]["feature"] == 5
    top = torch.argsort(model.weight.abs(), descending=True)[:2].tolist()
    assert [c["feature"] for c in cards[:2]] == top
    for c in cards:
        f = c["feature"]
        assert c["fire_chosen"] == pytest.approx((z[0::2, f] > 0).float().mean().item())
        assert c["fire_rejected"] == pytest.approx((z[1::2, f] > 0).float().mean().item())
        assert len(c["eval_contexts"]) <= 3 and len(c["logit_lens"]["promoted"]) == 4
        acts = [e["activation"] for e in c["eval_contexts"]]
        assert acts == sorted(acts, reverse=True)
    assert any(c["corpus_contexts"] for c in cards) and stats["n_corpus_vectors"] == cache.meta["n_sentence_vectors"]
    with pytest.raises(SarmError, match=r"config key explain.features: feature 128 is out of range"):
        X.feature_stats(model, cache, pairs, None, None, tiny["model_dir"], extra=[128])


# --- the cards in a real browser ---


def _card(feature: int, weight: float) -> dict:
    ctx = {"activation": 2.0, "id": "x", "side": "chosen", "left": "The cat sat on the mat", "token": ".", "right": " Then"}
    ev = {
        "activation": 1.5,
        "contribution": weight * 1.5,
        "id": "y",
        "side": "rejected",
        "subset": "s",
        "prompt": "p",
        "response_end": "the end",
    }
    return {
        "feature": feature,
        "why": ["largest |weight|"],
        "weight": weight,
        "weight_rank": 1,
        "fire_chosen": 0.5,
        "fire_rejected": 0.25,
        "fire_corpus": 0.01,
        "histogram": {"edges": [0, 1, 2, 3], "counts": [[5, 3, 1], [2, 2, 0]]},
        "corpus_contexts": [ctx] * 3,
        "eval_contexts": [ev] * 2,
        "logit_lens": {"promoted": ["cat", " dog"], "suppressed": ["<b>"]},
    }


def _colour_mask(img: np.ndarray, hex_colour: str, tol: int = 12) -> np.ndarray:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(img[..., :3].astype(int) - rgb) <= tol).all(-1)


def _longest_run(mask: np.ndarray) -> int:
    best = 0
    for row in mask[mask.any(1)]:
        padded = np.r_[0, row.astype(int), 0]
        edges = np.flatnonzero(np.diff(padded))
        best = max(best, int((edges[1::2] - edges[0::2]).max()))
    return best


def test_cards_render_in_headless_chromium(tmp_path):
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    stats = {
        "width": 128,
        "max_abs_weight": 1.0,
        "n_nonzero_weights": 64,
        "n_eval_sequences": 24,
        "n_corpus_vectors": 100,
        "features": [_card(7, 1.0), _card(9, -0.5), _card(11, 0.25)],
    }
    labels = {
        "7": {"label": "sentence ends <script>", "score": 4, "status": "labelled"},
        "9": {"label": None, "status": "unlabelled"},
    }
    page = tmp_path / "cards.html"
    page.write_text(X.cards_html(stats, labels, "test cards"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert dom.count('<section class="card"') == 3
    assert "sentence ends &lt;script&gt;" in dom and dom.count(">unlabelled<") == 2  # escaped; 9 and 11 have no label
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1600, 1200) and img.std() > 20  # not blank
    green, red = _colour_mask(img, X.POSITIVE), _colour_mask(img, X.NEGATIVE)
    blue, orange = _colour_mask(img, X.CHOSEN), _colour_mask(img, X.REJECTED)
    assert green.sum() > 500 and red.sum() > 500 and blue.sum() > 500 and orange.sum() > 500
    # two columns: card 7 (green, full bar) top left, card 9 (red, half) top right, card 11 (green, quarter) below
    ys, xs = np.nonzero(red)
    assert xs.min() > 600
    top_green = green[: ys.max() + 1]
    assert top_green[:, :600].sum() > 0 and top_green[:, 600:].sum() == 0
    full, half = _longest_run(top_green), _longest_run(red)
    assert 1.8 < full / half < 2.2  # bar length follows |w|
    assert green[ys.max() + 50 :, :600].any()  # the third card, below
    assert 1.8 < _longest_run(blue) / _longest_run(orange) < 2.2  # fires on chosen 50 % vs rejected 25 %


# --- labels ---

CARD = {
    "feature": 3,
    "corpus_contexts": [{"left": f"<|im_start|>user\nline {i}", "token": ".", "right": " next"} for i in range(5)],
    "eval_contexts": [{"response_end": "the response ends here"}] * 3,
}


def test_label_prompt_and_parsing():
    messages = L.build_prompt(CARD, n_contexts=6)
    text = messages[-1]["content"]
    assert messages[0]["role"] == "system" and "Label:" in text and "Score:" in text
    assert "1. …user line 0[[.]] next…" in text and "6. …the response ends here [[⟨end⟩]]" in text and "\n7." not in text
    assert "<|im_start|>" not in text
    with pytest.raises(SarmError, match="feature 4: no context fires it"):
        L.build_prompt({"feature": 4})
    assert L.parse_answer("Label: Sentence-final commas\nScore: 4") == {"label": "Sentence-final commas", "score": 4}
    assert L.parse_answer('Sure! {"label": "code endings", "score": "5"}') == {"label": "code endings", "score": 5}
    assert L.parse_answer("**Label:** legal advice. It fires on\nScore: 9") == {"label": "legal advice", "score": None}
    for garbage in (
        "",
        "I cannot help",
        "Label: [1-5]",
        "Label: 1. Ben",
        "Label: the same concept",
        "Label: ⏎ assistant",
        None,
        "{not json",
    ):
        assert L.parse_answer(garbage) is None, garbage


class CountingJudge:
    name = "counting"

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def __call__(self, messages, attempt=0):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_labels_are_cached_and_garbage_is_retried(tmp_path):
    cards = [CARD, {**CARD, "feature": 8, "eval_contexts": []}]
    # each attempt asks every pending feature in card order: (3, 8), (3, 8), (8)
    judge = CountingJudge(["nonsense", ConnectionError("down"), "Label: periods\nScore: 3", "??", "still nothing"])
    cache = L.LabelCache(tmp_path / "cache.json")
    out = L.label_features(cards, judge, cache, n_features=2, retries=2, backoff_s=0)
    assert out["3"] == {"label": "periods", "score": 3, "judge": "counting", "status": "labelled"}
    assert (
        out["8"]["status"] == "unlabelled"
        and len(out["8"]["problems"]) == 3
        and "ConnectionError" in " ".join(out["8"]["problems"])
    )
    assert judge.calls == 5
    again = CountingJudge(["Label: full stops\nScore: 2"])
    out = L.label_features(cards, again, L.LabelCache(tmp_path / "cache.json"), n_features=2, retries=0, backoff_s=0)
    assert out["3"]["status"] == "cached" and out["3"]["label"] == "periods"  # not asked again
    assert out["8"] == {"label": "full stops", "score": 2, "judge": "counting", "status": "labelled"} and again.calls == 1


def test_endpoint_judge_over_loopback(tmp_path, caplog):
    """A fake OpenAI-compatible server: garbage, then a body that is not JSON, then a valid answer."""
    replies = [
        (200, json.dumps({"choices": [{"message": {"content": "I like turtles"}}]})),
        (200, "<html>bad gateway</html>"),
        (200, json.dumps({"choices": [{"message": {"content": '{"label": "refusals", "score": 5}'}}]})),
    ]

    def answer(handler):
        status, body = replies.pop(0)
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(body.encode())

    with server(answer) as (url, requests):
        settings = {
            "judge": "openai",
            "endpoint": {"base_url": f"{url}/v1", "model": "judge-1", "api_key_env": "SARM_TEST_KEY", "timeout_s": 10},
        }
        os.environ["SARM_TEST_KEY"] = "k-123"
        try:
            judge = L.make_judge(settings, "unused")
            out = L.label_features([CARD], judge, L.LabelCache(tmp_path / "c.json"), n_features=1, retries=2, backoff_s=0)
        finally:
            os.environ.pop("SARM_TEST_KEY", None)
    seen = [(r["path"], json.loads(r["body"]), r["headers"].get("Authorization")) for r in requests]
    assert out["3"]["label"] == "refusals" and out["3"]["score"] == 5 and out["3"]["status"] == "labelled"
    assert (
        len(seen) == 3
        and seen[0][0] == "/v1/chat/completions"
        and seen[0][1]["model"] == "judge-1"
        and seen[0][2] == "Bearer k-123"
    )
    assert seen[0][1]["messages"] == L.build_prompt(CARD)
    # the endpoint is down (the server has closed): retries, then unlabelled, and the run goes on saying so
    judge = L.EndpointJudge(f"{url}/v1", "judge-1", None, timeout_s=2)
    with caplog.at_level("WARNING"):
        out = L.label_features([CARD], judge, L.LabelCache(None), n_features=1, retries=1, backoff_s=0)
    assert out["3"]["status"] == "unlabelled" and len(out["3"]["problems"]) == 2
    assert "feature 3: unlabelled after 2 attempts" in caplog.text


# --- the preference shift ---


def test_preference_shift_moves_only_responses_that_fire(tiny, tmp_path):
    model, cache, pairs = tiny["model"], tiny["cache"], tiny["pairs"]
    tables = {"eval": (cache, pairs)}
    settings = {"categories": ["safety"], "subsets": [], "n_features": 1, "features": [], "factor": 3.0}
    report, features, responses = S.preference_shift(model, tables, settings, "eval", tmp_path / "shifted")
    edited = RewardModel.from_pretrained(tmp_path / "shifted")
    ids = edited.config["edit"]["features"]
    assert len(ids) == 1 and torch.equal(edited.weight[ids], model.weight[ids] * 3.0)
    others = torch.ones(len(model.weight), dtype=bool)
    others[ids] = False
    assert torch.equal(edited.weight[others], model.weight[others])
    # ranked by firing rate on chosen minus rejected of the target set, among positive weights
    z = model.features(cache.final())
    target = torch.tensor(pairs["category"].eq("safety").to_numpy())
    score = (z[0::2][target] > 0).float().mean(0) - (z[1::2][target] > 0).float().mean(0)
    assert (model.weight[ids] > 0).all()
    score[model.weight <= 0] = -np.inf
    assert score[ids].min() >= score[others].max()
    # the reward change is exactly zero where none of the edited features fires; the saved model agrees.
    # (Edit a feature that fires on some responses only, so both sides of that claim are tested.)
    rate = (z > 0).float().mean(0)
    partial = int(torch.nonzero((rate > 0) & (rate < 1) & (model.weight > 0))[0])
    settings = {**settings, "features": [partial]}
    report, features, responses = S.preference_shift(model, tables, settings, "eval", tmp_path / "shifted-one")
    edited, ids = RewardModel.from_pretrained(tmp_path / "shifted-one"), [partial]
    before, after = model.score_hidden(cache.final()), edited.score_hidden(cache.final())
    fires = (z[:, ids] > 0).any(1)
    assert (after - before)[~fires].eq(0).all() and (~fires).any()
    assert ((after - before)[fires] != 0).all() and fires.any()
    np.testing.assert_array_equal(responses["after"].to_numpy(), after.numpy())
    assert (responses.loc[~responses.fires, "delta"] == 0).all()
    overall = report[report["set"] == "overall"].iloc[0]
    assert overall["mean_shift_not_firing"] == 0.0
    assert overall["fire_chosen_%"] == pytest.approx(100 * fires[0::2].float().mean().item())
    right = pd.Series((after[0::2] > after[1::2]).numpy()).groupby(pairs["category"].to_numpy()).mean()
    assert overall["accuracy_after_%"] == pytest.approx(100 * right.mean())  # RewardBench's mean of categories
    assert report["set"].iloc[0] == "target set" and report["pairs"].iloc[0] == 4
    assert list(features["feature"]) == ids
    S.shift_figure(responses, tmp_path / "shift.png", "test")
    assert (tmp_path / "shift.png").stat().st_size > 10_000


def test_preference_shift_bad_input(tiny, tmp_path):
    model, tables = tiny["model"], {"eval": (tiny["cache"], tiny["pairs"])}
    base = {"categories": ["nope"], "subsets": [], "n_features": 1, "features": [], "factor": 2.0}
    with pytest.raises(
        SarmError,
        match=r"config key shift.categories: the target set is empty: no pair of table 'eval' is in categories \['nope'\]",
    ):
        S.preference_shift(model, tables, base, "eval", tmp_path / "a")
    with pytest.raises(SarmError, match="config key shift: name the target set"):
        S.preference_shift(model, tables, {**base, "categories": []}, "eval", tmp_path / "b")
    with pytest.raises(SarmError, match="config key shift.features: feature 500 is out of range"):
        S.preference_shift(model, tables, {**base, "categories": ["safety"], "features": [500]}, "eval", tmp_path / "c")
    assert not (tmp_path / "c").exists()
