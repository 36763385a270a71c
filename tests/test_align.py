"""Best-of-N on the real AlpacaEval file: selectors, the N curve, caching candidates once, bad files."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch

from sarm import activations as A
from sarm import models
from sarm.align import published_results, read_bon, score_candidates, win_rate_curve, win_rates
from sarm.errors import SarmError
from sarm.reward_model import RewardModel

BON = "bon/alpacaeval_bon_tulu2dpo13b_n11_200.jsonl.gz"


@pytest.fixture(scope="module")
def bon(shared_data):
    return read_bon(shared_data / BON)


def test_baselines_reproduce_the_figures_of_the_data_file(bon):
    # PROVENANCE.md: random 31.1 %, longest 38.2 %, shortest 24.0 %, oracle 58.9 % on all 200 prompts
    rates = win_rates(bon, []).set_index("selector")["win_rate"].round(1).to_dict()
    assert rates == {"random": 31.1, "longest": 38.2, "shortest": 24.0, "oracle": 58.9}
    assert bon["id"].nunique() == 200 and (bon.groupby("id").size() == 11).all()


def test_a_score_column_picks_its_highest_candidate(bon):
    scores = bon.assign(good=bon["win_prob"], bad=-bon["win_prob"], first=-bon["candidate"].astype(float))
    rates = win_rates(scores, ["good", "bad", "first"]).set_index("selector")["win_rate"]
    assert rates["good"] == rates["oracle"] and rates["bad"] < rates["shortest"]
    first = scores[scores.candidate == 0]["win_prob"].mean() * 100  # candidate 0 is not the random baseline
    assert rates["first"] == pytest.approx(first) and abs(first - rates["random"]) > 1


def test_curve_runs_from_a_random_pick_to_the_full_set(bon):
    scores = bon.assign(good=bon["win_prob"])
    curve = win_rate_curve(scores, ["good"], draws=50, seed=0).set_index("N")
    full = win_rates(scores, ["good"]).set_index("selector")["win_rate"]
    assert list(curve.index) == list(range(1, 12))
    for name in ("good", "longest", "shortest", "oracle", "random"):
        assert curve.loc[11, name] == pytest.approx(full[name])  # N = 11: every subset is the whole set
        assert curve.loc[1, name] == pytest.approx(full["random"], abs=0.6)  # N = 1: one random candidate
    assert curve["oracle"].is_monotonic_increasing and curve["shortest"].is_monotonic_decreasing
    again = win_rate_curve(scores, ["good"], draws=50, seed=0)
    pd.testing.assert_frame_equal(curve.reset_index(), again)  # seeded


def test_sample_of_prompts_is_seeded_and_whole(shared_data):
    a, b = read_bon(shared_data / BON, 7, seed=3), read_bon(shared_data / BON, 7, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert a["id"].nunique() == 7 and len(a) == 77
    assert a["prompt"][0] == [{"role": "user", "content": a["instruction"][0]}]


def test_published_results_are_labelled_best_of_16(shared_data):
    folder = shared_data / "reference_results/bon_eval"
    table = published_results(folder / "bon_eval_results.json", folder / "merged_leaderboard.csv").set_index("selector")
    assert (table["N"] == 16).all() and (table["prompts"] == 805).all()
    assert table.loc["openbmb/UltraRM-13b", "win_rate"] == pytest.approx(49.1026, abs=1e-3)
    assert table.loc["random", "win_rate"] == pytest.approx(pd.read_csv(folder / "merged_leaderboard.csv")["win_rate"].mean())
    assert not any(name.startswith("random_") for name in table.index)


def test_cached_candidates_score_like_raw_text_for_every_model(trained, tiny_model_dir, shared_data, tmp_path):
    root, _, _ = trained
    candidates = read_bon(shared_data / BON, 2, seed=0)
    tokenizer = models.load_tokenizer(tiny_model_dir)
    backbone = models.load_truncated(tiny_model_dir, 2, torch.float32)
    info = A.cache_sequences(
        backbone,
        tokenizer,
        candidates[["id", "candidate", "prompt", "response"]],
        tmp_path / "bon",
        max_length=96,
        batch_size=5,
        with_sentences=False,
        counts={"n_prompts": 2},
    )
    assert info["n_sequences"] == 22 and info["n_prompts"] == 2 and info["n_truncated"] > 0
    sarm = RewardModel.from_pretrained(root / "rm")
    dense = RewardModel({**sarm.config, "features": "hidden"}, torch.randn(64, generator=torch.Generator().manual_seed(0)))
    scores = score_candidates({"sarm": sarm, "dense": dense}, A.ActivationCache(tmp_path / "bon"), candidates)
    raw = sarm.score(list(candidates.prompt), list(candidates.response), batch_size=7)
    np.testing.assert_allclose(scores["sarm"], raw, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        scores["dense"], dense.score(list(candidates.prompt), list(candidates.response)), atol=1e-4, rtol=0
    )
    assert scores["truncated"].sum() == info["n_truncated"]
    with pytest.raises(SarmError, match="cached from other candidates"):
        score_candidates({"sarm": sarm}, A.ActivationCache(tmp_path / "bon"), candidates.iloc[::-1])


def write_jsonl(path, rows):
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "Hi", "responses": ["a", "b"]}],
            "row 1 is not a best-of-N row (missing instruction, candidates; it has prompt, responses); expected fields id, instruction, candidates: [{output, win_prob_vs_ref}, ...]",
        ),
        ([{"instruction": "Hi", "candidates": [{"output": "a", "score": 1}]}], "candidate 0 has ['output', 'score']"),
        (
            [{"instruction": "Hi", "candidates": [{"output": "a", "win_prob_vs_ref": 2}]}],
            "win_prob_vs_ref = 2 is not a probability",
        ),
        (
            [
                {"instruction": "Hi", "candidates": [{"output": "a", "win_prob_vs_ref": 0.5}]},
                {"instruction": "Yo", "candidates": []},
            ],
            "row 2 is not a best-of-N row (candidates is not a non-empty list)",
        ),
    ],
)
def test_a_file_of_another_shape_names_the_fields_it_expected(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bon.jsonl.gz", rows)
    with pytest.raises(SarmError) as error:
        read_bon(path)
    assert message in str(error.value) and "\n" not in str(error.value) and str(path) in str(error.value)
