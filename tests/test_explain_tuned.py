"""The interpretability section for a fine-tuned SARM (the paper's SARM-4B recipe, mode finetune): attributions, feature
cards, the preference shift and best-of-N read states cached through the model's own tuned layers 1..L, and give the
rewards its own scoring of the text gives. The real rules on the tiny config, and a dry run of the paper config."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from test_cluster import planned_jobs, repo_config
from test_workflow import snakemake, tiny_config

from sarm.activations import ActivationCache
from sarm.data import read_pairs
from sarm.reward_model import RewardModel

# the paper path (make test-paper-path): SARM-4B's recipe is a tuned SARM, and its real rules take ~2 minutes here
pytestmark = pytest.mark.paper_path

TABLES = ["val", "rb-like"]
TARGETS = [
    *(f"results/explain/sarm/attributions/{table}.parquet" for table in TABLES),
    "results/explain/sarm/cards.html",
    "results/tables/preference_shift.csv",
    "results/tables/bon_winrate.csv",
    "results/eval/sarm/rb-like/scores.parquet",
]
# one thread a job, so that two run at once on two cores (most of a tiny job is starting Python)
ONE_THREAD = [
    "--set-threads",
    *(
        f"{rule}=1"
        for rule in (
            "cache_activations",
            "cache_tuned_activations",
            "cache_bon",
            "cache_tuned_bon",
            "sae",
            "finetune_reward",
            "train_reward",
            "evaluate",
            "feature_stats",
            "label_features",
            "preference_shift",
        )
    ),
]


def tuned_config(tiny_model_dir, shared_data) -> dict:
    """The tiny config with `sarm` fine-tuned (layers 1..2 + head, SAE frozen) beside a frozen dense head. Its SAE
    learns sentence ends only, so that on the random model's final tokens (all one end-of-turn token) its features
    can fire on some responses and not on others."""
    config = tiny_config(tiny_model_dir, shared_data)
    return config | {
        "sae": {**config["sae"], "include_final_token": False},
        "reward_models": {"sarm": {"features": "sae", "mode": "finetune"}, "dense": {"features": "hidden"}},
        "finetune": {
            "epochs": 1,
            "max_pairs": 16,
            "lr": 1e-3,
            "head_lr": 1e-2,
            "global_batch_size": 4,
            "per_device_batch_size": 2,
            "gradient_checkpointing": False,
            "dtype": "float32",
            "eval_batch_size": 4,
        },
        "explain": {"n_weight": 3, "n_frequent": 2, "n_contexts": 6, "labels": {"judge": "none"}},
        "shift": {"categories": ["safety"], "n_features": 1},
    }


@pytest.fixture(scope="module")
def tuned_run(tiny_model_dir, shared_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tuned-explain")
    result = snakemake(workdir, tuned_config(tiny_model_dir, shared_data), *TARGETS, *ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir / "results"


def text_rewards(results, table: str) -> np.ndarray:
    """The tuned model's own scores of a table's text, numbered as cached sequences are (2i chosen, 2i+1 rejected):
    the rule evaluate's (rb-like), or the same call here (val)."""
    if (results / f"eval/sarm/{table}/scores.parquet").exists():
        scores = pd.read_parquet(results / f"eval/sarm/{table}/scores.parquet")
    else:
        from sarm.evaluate import score_text
        from sarm.reward_model import load as load_reward_model

        scores = score_text(
            load_reward_model(results / "reward/sarm"), read_pairs(results.parent / f"resources/tables/{table}.parquet"), 4
        )
    return np.column_stack([scores.score_chosen, scores.score_rejected]).reshape(-1)


def test_attributions_sum_to_the_tuned_models_own_scores_of_the_text(tuned_run):
    assert (tuned_run / "eval/sarm/rb-like/scores.parquet").exists()
    for table in TABLES:
        attributions = pd.read_parquet(tuned_run / f"explain/sarm/attributions/{table}.parquet")
        per_seq = attributions.groupby("seq").agg(reward=("reward", "first"), total=("contribution", "sum"))
        assert per_seq["total"].to_numpy() == pytest.approx(per_seq["reward"].to_numpy(), abs=1e-5)
        # a tuned model is scored from the text, through its backbone: its cache gives the same rewards
        assert per_seq["reward"].to_numpy() == pytest.approx(text_rewards(tuned_run, table), abs=1e-4), table
        cache = ActivationCache(tuned_run / f"activations/tuned/sarm/{table}")
        assert cache.meta["backbone"].endswith("reward/sarm/backbone")


def test_the_tuned_backbone_is_what_is_read_not_the_base_models(tuned_run):
    model = RewardModel.from_pretrained(tuned_run / "reward/sarm")
    tuned = ActivationCache(tuned_run / "activations/tuned/sarm/val").final()
    base = ActivationCache(tuned_run / "activations/tiny-L2/val").final()
    assert tuned.shape == base.shape and (tuned - base).abs().max() > 1e-3  # fine-tuning moved layers 1..2
    attributions = pd.read_parquet(tuned_run / "explain/sarm/attributions/val.parquet")
    rewards = attributions.groupby("seq")["reward"].first().to_numpy()
    assert not np.allclose(model.score_hidden(base).numpy(), rewards, atol=1e-4)
    assert np.allclose(model.score_hidden(tuned).numpy(), rewards, atol=1e-6)


def test_feature_cards_read_the_tuned_caches(tuned_run):
    stats = json.loads((tuned_run / "explain/sarm/features.json").read_text())
    model = RewardModel.from_pretrained(tuned_run / "reward/sarm")
    z = model.features(ActivationCache(tuned_run / "activations/tuned/sarm/rb-like").final())
    assert stats["n_eval_sequences"] == len(z) and stats["n_corpus_vectors"] > 0
    for card in stats["features"]:
        f = card["feature"]
        assert card["weight"] == pytest.approx(float(model.weight[f]))
        assert card["fire_chosen"] == pytest.approx(float((z[0::2, f] > 0).float().mean()))
        assert card["fire_rejected"] == pytest.approx(float((z[1::2, f] > 0).float().mean()))
    page = (tuned_run / "explain/sarm/cards.html").read_text()
    assert page.count('<section class="card"') == len(stats["features"]) >= 3
    assert "layers 1..2 fine-tuned, mode finetune" in page
    train = ActivationCache(tuned_run / "activations/tuned/sarm/train")
    assert train.meta["n_sentence_vectors"] > 0  # the cards' corpus: sentence ends through the tuned layers
    assert ActivationCache(tuned_run / "activations/tuned/sarm/val").meta["n_sentence_vectors"] == 0


def test_preference_shift_moves_only_responses_that_fire_the_edited_features(tuned_run):
    responses = pd.read_parquet(tuned_run / "shift/sarm/responses.parquet")
    # On the tiny random model the edited feature may fire on every response (it did once its caches were computed
    # in packed rows); responses that do not fire are checked wherever there are any (test_explain covers them too)
    assert set(responses["table"]) == set(TABLES) and responses["fires"].any()
    assert (responses.loc[~responses.fires, "delta"] == 0).all()
    assert (responses.loc[responses.fires, "delta"] > 0).all()  # factor 2 on positive weights
    for table in TABLES:  # `before` is the tuned model's reward of the text
        text = text_rewards(tuned_run, table)
        assert responses.loc[responses.table == table, "before"].to_numpy() == pytest.approx(text, abs=1e-4)
    # the edited model is a tuned model too: it scores text through sarm's backbone, as `after` says
    edited = RewardModel.from_pretrained(tuned_run / "shift/sarm/model")
    assert edited.backbone_path.resolve() == (tuned_run / "reward/sarm/backbone").resolve()
    pairs = read_pairs(tuned_run.parent / "resources/tables/rb-like.parquet")
    rb = responses[responses.table == "rb-like"]
    chosen = rb[rb.side == "chosen"]
    moved = chosen[chosen.fires].head(2).index.tolist() + chosen[~chosen.fires].head(2).index.tolist()
    rows = pairs.iloc[chosen.loc[moved, "pair"].to_numpy()]
    text = edited.score(list(rows.prompt), list(rows.chosen))
    assert text == pytest.approx(chosen.loc[moved, "after"].to_numpy(), abs=1e-4)
    table = pd.read_csv(tuned_run / "tables/preference_shift.csv")
    assert table["set"].iloc[0] == "target set" and (table["mean_shift_not_firing"] == 0).all()


def test_best_of_n_scores_the_tuned_model_from_its_own_cache(tuned_run):
    scores = pd.read_parquet(tuned_run / "bon/scores.parquet")
    assert len(scores) == 44 and set(scores.columns[-2:]) == {"sarm", "dense"}
    tuned = json.loads((tuned_run / "activations/tuned/sarm/bon/meta.json").read_text())
    assert tuned["n_sequences"] == 44 and tuned["n_prompts"] == 4
    # the frozen dense head still reads the base model's one cache
    dense = RewardModel.from_pretrained(tuned_run / "reward/dense")
    base = dense.score_hidden(ActivationCache(tuned_run / "activations/tiny-L2/bon").final()).numpy()
    assert scores["dense"].to_numpy() == pytest.approx(base, abs=1e-6)
    from sarm.align import read_candidates

    candidates = read_candidates(tuned_run.parent / "resources/bon/candidates.parquet").head(5)
    sarm = RewardModel.from_pretrained(tuned_run / "reward/sarm")
    text = sarm.score(list(candidates.prompt), list(candidates.response))
    assert scores["sarm"].head(5).to_numpy() == pytest.approx(text, abs=1e-4)
    winrate = pd.read_csv(tuned_run / "tables/bon_winrate.csv")
    assert {"sarm", "dense"} <= set(winrate.loc[winrate.source == "this run", "selector"])


def test_the_paper_config_plans_the_interpretability_section(shared_data, tmp_path):
    """config/paper/sarm-4b.yaml (SARM fine-tuned): the attributions and cards, read through sarm's own backbone;
    with a shift target and a best-of-N file, the preference shift and best-of-N of both tuned models."""
    config = repo_config("config/paper/sarm-4b.yaml", shared_data)
    result = snakemake(tmp_path / "paper", config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    tables = ["train", "val", "reward-bench-2", "reward-bench"]
    tuned = {j["wildcards"]["table"] for j in jobs if j["rule"] == "cache_tuned_activations" and j["wildcards"]["rm"] == "sarm"}
    assert tuned == set(tables) and all(j["wildcards"]["rm"] == "sarm" for j in jobs if j["rule"] == "cache_tuned_activations")
    assert {j["wildcards"]["table"] for j in jobs if j["rule"] == "attributions"} == set(tables[1:])
    assert {"feature_stats", "label_features", "feature_cards"} <= {j["rule"] for j in jobs}
    attributions = re.search(r"rule attributions:\n    input: ([^\n]*)", result.stdout + result.stderr).group(1)
    assert "results/sarm-4b/activations/tuned/sarm/" in attributions

    overlay = config | {
        "shift": {"table": "reward-bench", "categories": ["safety"]},
        "bon": {"path": str(shared_data / "bon/alpacaeval_bon_tulu2dpo13b_n11_200.jsonl.gz")},
    }
    result = snakemake(tmp_path / "paper-shift", overlay, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    rules = {j["rule"] for j in jobs}
    assert {"preference_shift", "bon_scores", "bon_report"} <= rules and "cache_bon" not in rules
    assert {j["wildcards"]["rm"] for j in jobs if j["rule"] == "cache_tuned_bon"} == {"sarm", "dense"}


def test_a_frozen_sarm_still_reads_the_base_models_caches(tiny_model_dir, shared_data, tmp_path):
    result = snakemake(tmp_path, tiny_config(tiny_model_dir, shared_data), "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "cache_tuned" not in output
    for rule in ("attributions", "feature_stats", "preference_shift", "bon_scores"):
        block = re.search(rf"rule {rule}:\n    input: ([^\n]*)", output).group(1)
        assert "results/activations/tiny-L2/" in block and "tuned" not in block, rule
