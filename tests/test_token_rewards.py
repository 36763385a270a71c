"""Token-level rewards (sarm.token_rewards): the head at every response token of the tiny model, its last value the
sequence reward (SAE and hidden features, SparseRM, the full-depth classifier), truncation, the HTML view, the
server option, the command line and the explain stage's rule."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch

from sarm import cli
from sarm.reward_model import ClassifierRewardModel, ProjectionRewardModel, RewardModel, base_model_config, model_config
from sarm.token_rewards import TokenRewards, render_html, write_pages

MODEL_SPEC = {"name": "tiny", "layer": 2, "dtype": "float32", "max_length": 96}
PROMPTS = ["How do I boil an egg?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]
RESPONSES = ["Boil it for 8 minutes, then cool it in cold water. Ça va — 🥚!", "Blue."]


@pytest.fixture(scope="module")
def sarm(trained):
    return RewardModel.from_pretrained(trained[0] / "rm")


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    torch.manual_seed(1)
    return RewardModel(model_config({"features": "hidden"}, MODEL_SPEC, tiny_model_dir, 64, {}), torch.randn(64))


@pytest.fixture(scope="module")
def sparse_rm(tiny_model_dir):
    torch.manual_seed(2)
    m = 6
    config = {**model_config({"features": "sae"}, MODEL_SPEC, tiny_model_dir, 64, {}), "format": "sarm-sparse-rm"}
    config["sparse_rm"] = {"latents": list(range(m)), "mlp_hidden": 8}
    mlp = torch.nn.Sequential(torch.nn.Linear(m, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1, bias=False))
    tensors = {
        "directions": torch.nn.functional.normalize(torch.randn(m, 64), dim=1),
        "proj_mean": torch.randn(m),
        "proj_std": torch.rand(m) + 0.5,
        **{f"mlp.{k}": v for k, v in mlp.state_dict().items()},
    }
    return ProjectionRewardModel(config, tensors)


@pytest.fixture(scope="module")
def classifier(tiny_model_dir, tmp_path_factory):
    """A random-init full-depth sequence classifier saved as `sarm.finetune` saves one."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("classifier")
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(3)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base = base_model_config(MODEL_SPEC, tiny_model_dir, str(folder))
    (folder / "reward_model.json").write_text(json.dumps({"format": "hf-sequence-classifier", "base_model": base}))
    return ClassifierRewardModel(folder)


@pytest.mark.parametrize("name", ["sarm", "dense", "sparse_rm", "classifier"])
def test_the_last_token_reward_is_the_sequence_reward(name, request):
    model = request.getfixturevalue(name)
    expected = model.score(PROMPTS, RESPONSES)
    records = model.token_rewards_batch(PROMPTS, RESPONSES)
    for record, reward, prompt, response in zip(records, expected, PROMPTS, RESPONSES):
        assert record.reward == pytest.approx(reward, abs=1e-4)
        assert record.tokens[-1] == "<|im_end|>" and response in record.text  # the response, then the end-of-turn token
        assert record.text.startswith(response[:4])  # from the response's first token
        assert len(record.tokens) == len(record.rewards) == len(record.positions) == len(record.offsets)
        assert len(set(np.round(record.rewards, 6))) > 1  # a curve, not the final value repeated
        single = model.token_rewards(prompt, response)
        np.testing.assert_allclose(single.rewards, record.rewards, atol=1e-4)  # the batch is the singles


def test_dense_rewards_are_the_differences_and_sum_to_the_shaped_return(sarm):
    record = sarm.token_rewards(PROMPTS[0], RESPONSES[0])
    dense = record.dense()
    assert dense[0] == 0 and dense.sum() == pytest.approx(record.reward - record.rewards[0], abs=1e-5)
    np.testing.assert_allclose(np.cumsum(dense) + record.rewards[0], record.rewards, atol=1e-5)
    start, end = record.offsets[3]
    assert record.text[start:end] == record.tokens[3]


def test_top_features_are_each_tokens_largest_contributions(sarm):
    """The tiny SAE has k = 8 active latents: the 8 largest contributions of a token are all of them."""
    record = sarm.token_rewards(PROMPTS[0], RESPONSES[0], top_k=8)
    for reward, top in zip(record.rewards, record.top_features):
        magnitudes = [abs(f["contribution"]) for f in top]
        assert magnitudes == sorted(magnitudes, reverse=True) and 0 not in magnitudes
        assert sum(f["contribution"] for f in top) == pytest.approx(reward, abs=1e-4)
        assert all(f["contribution"] == pytest.approx(f["activation"] * float(sarm.weight[f["feature"]]), rel=1e-4) for f in top)


def test_left_truncation_keeps_the_end_and_cuts_into_the_response(sarm):
    long_prompt = "Tell me everything about the sea. " * 40
    record = sarm.token_rewards(long_prompt, RESPONSES[0])
    assert record.truncated and record.positions[-1] == 95  # max_length 96: the kept sequence's last token
    assert record.reward == pytest.approx(sarm.score([long_prompt], [RESPONSES[0]])[0], abs=1e-4)
    long_response = "The sea is wide and deep. " * 40
    record = sarm.token_rewards("Hi", long_response)
    assert record.truncated and len(record.tokens) == 96 and record.positions[0] == 0
    assert record.reward == pytest.approx(sarm.score(["Hi"], [long_response])[0], abs=1e-4)


def test_the_html_escapes_the_response_and_has_one_span_per_token(sarm):
    response = 'Sure: <script>alert("x")</script> & "quotes" <i>it</i>'
    record = sarm.token_rewards("Say something.", response, top_k=2)
    page = render_html(record, "view <of> one", prompt="<img src=x onerror=alert(1)>")
    assert "<script>" not in page and "<i>" not in page and "<img" not in page
    assert "view &lt;of&gt; one" in page and "&lt;img src=x" in page
    spans = re.findall(r'<span class="tok" style="background:(#[0-9a-f]{6})" title="([^"]*)">([^<]*)</span>', page)
    assert len(spans) == len(record.tokens) and page.count('class="tok"') == len(record.tokens)
    assert f"{record.reward:+.4f}" in page and 'class="legend"' in page
    # the spans' text unescaped is the response's tokens; the extreme token is full colour, its tooltip its value
    import html

    assert "".join(html.unescape(text) for _, _, text in spans) == record.text
    t = int(np.abs(record.rewards).argmax())
    assert spans[t][0] in ("#1a9850", "#d73027") and f"r = {record.rewards[t]:+.4f}" in html.unescape(spans[t][1])
    assert f"#{record.top_features[t][0]['feature']}" in html.unescape(spans[t][1])


def test_a_hand_made_record_colours_by_sign():
    record = TokenRewards(["a", "b", "c"], [(0, 1), (1, 2), (2, 3)], np.arange(3), np.array([-2.0, 0.0, 1.0]), False)
    colours = re.findall(r"background:(#[0-9a-f]{6})", render_html(record))
    assert colours[:2] == ["#d73027", "#ffffff"]  # full red at -max |r|, white at 0
    r, g, b = (int(colours[2][i : i + 2], 16) for i in (1, 3, 5))
    assert 26 < r < g and 80 < b < 255 and r < b  # +max/2: a paler green than the full #1a9850
    assert record.to_dict(dense=True)["dense"] == [0.0, 2.0, 1.0]


def test_the_server_returns_token_rewards_on_request(sarm):
    from test_serve import post

    from sarm.serve import make_server

    sarm.load_backbone()
    server = make_server(sarm, "127.0.0.1", 0, max_batch=4, max_wait_ms=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, out = post(url, {"prompts": PROMPTS, "responses": RESPONSES, "token_rewards": True})
        assert status == 200 and len(out["token_rewards"]) == 2
        expected = sarm.token_rewards_batch(PROMPTS, RESPONSES)
        for got, reward, record in zip(out["token_rewards"], out["rewards"], expected):
            assert got["rewards"][-1] == pytest.approx(reward, abs=1e-4)
            assert got["tokens"] == record.tokens
            np.testing.assert_allclose(got["rewards"], record.rewards, atol=1e-4)
            assert sum(got["dense"]) == pytest.approx(got["rewards"][-1] - got["rewards"][0], abs=1e-4)
        assert "token_rewards" not in post(url, {"prompts": PROMPTS, "responses": RESPONSES})[1]
        status, out = post(url, {"query": ["x"], "token_rewards": "yes"})
        assert status == 400 and '"token_rewards" must be true or false' in out["error"]
    finally:
        server.shutdown()
        server.server_close()
        server.service.close()


def test_the_command_line_prints_token_rewards_and_writes_the_page(trained, sarm, tmp_path, capsys):
    page = tmp_path / "view.html"
    args = ["score", "--model", str(trained[0] / "rm"), "--prompt", PROMPTS[0], "--response", RESPONSES[0]]
    cli.main([*args, "--token-rewards", "--html", str(page), "--top-features", "2"])
    out = json.loads(capsys.readouterr().out)
    assert out["reward"] == pytest.approx(float(sarm.score(PROMPTS[:1], RESPONSES[:1])[0]), abs=1e-4)
    assert out["rewards"][-1] == out["reward"] and len(out["top_features"][0]) == 2
    assert page.read_text().count('class="tok"') == len(out["tokens"])
    with pytest.raises(SystemExit, match="--html .*: cannot write it"):
        cli.main([*args, "--html", str(tmp_path / "missing" / "view.html")])


def test_the_explain_pages_link_each_pair(sarm, trained, tmp_path):
    pairs = trained[1]
    pages = write_pages(sarm, pairs, tmp_path / "token_rewards", 2, top_k=2, title="t")
    assert [p.name for p in pages] == ["000_chosen.html", "000_rejected.html", "001_chosen.html", "001_rejected.html"]
    index = (tmp_path / "token_rewards" / "index.html").read_text()
    assert all(f'href="{p.name}"' in index for p in pages)
    reward = sarm.score(pairs.prompt[1:2].tolist(), pairs.rejected[1:2].tolist())[0]
    assert f"<b>{reward:+.4f}</b>" in pages[3].read_text() and f"{reward:+.4f}" in index


def test_the_rule_is_planned_with_the_default_config(shared_data, tmp_path):
    from test_cluster import repo_config
    from test_workflow import snakemake

    config = repo_config("config/config.yaml", shared_data)
    result = snakemake(tmp_path / "default", config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"rule token_rewards:\n(    .*\n)*?    output: results/explain/sarm/token_rewards\n", result.stdout)
    config["explain"]["token_rewards"] = {"n_pairs": 0}
    result = snakemake(tmp_path / "off", config, "-n")
    assert result.returncode == 0 and "rule token_rewards:" not in result.stdout


def test_the_rules_job_is_sized_from_the_pairs_and_the_model(shared_data):
    from test_cluster import repo_config

    from sarm.cluster import model_shape
    from sarm.workflow.resources import estimate

    def sized(name, n_pairs):
        config = repo_config(name, shared_data)
        config.setdefault("explain", {})["token_rewards"] = {"n_pairs": n_pairs}
        return estimate("token_rewards", config, model_shape(config), threads=2)

    small, more, paper = sized("config/config.yaml", 3), sized("config/config.yaml", 300), sized("config/paper/sarm-4b.yaml", 3)
    assert small["gpu"] == 0 and small["mem_mb"] <= 8000 and small["runtime"] <= 30
    assert more["runtime"] > small["runtime"] and paper["mem_mb"] > small["mem_mb"] and paper["runtime"] > small["runtime"]
