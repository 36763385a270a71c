"""Every reward-model variant of config/ablations.yaml as one tiny DAG, and the orderings table's statistics."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from test_rewardbench_v2 import grouped_scores
from test_workflow import REPO, snakemake, tiny_config

from sarm.ablations import comparisons, ordering_table, verdict
from sarm.errors import SarmError
from sarm.variants import specs_from_config


@pytest.fixture(scope="module")
def ablation_run(tiny_model_dir, shared_data, tmp_path_factory):
    """The tiny model with the ablation config's reward models (all modes and SAE kinds)."""
    ablations = yaml.safe_load((REPO / "config/ablations.yaml").read_text())
    # every mode and SAE kind (dense heads, frozen TopK-off: covered by test_finetune and test_workflow)
    keep = ["sarm", "sarm-random-sae", "sarm-token-sae", "sarm-finetuned", "sarm-joint", "full-depth", "sparse-rm"]
    variants = yaml.safe_load((REPO / "config/variants.yaml").read_text())["reward_models"]  # the seed papers' too
    config = tiny_config(tiny_model_dir, shared_data) | {
        "reward_models": {name: ablations["reward_models"][name] for name in keep}
        | {name: variants[name] for name in ("sarm-multi", "sarm-poe")},
        "finetune": {**ablations["finetune"], "max_pairs": 12, "global_batch_size": 4, "per_device_batch_size": 2},
        "bon": {"path": None},
        # the cards and attributions of another model than `sarm` (config key explain.reward_model), for real
        "explain": {"labels": {"judge": "none"}, "reward_model": "sarm-token-sae"},
    }
    workdir = tmp_path_factory.mktemp("ablations")
    result = snakemake(workdir, config)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, config["reward_models"]


def test_every_variant_is_trained_evaluated_and_compared(ablation_run):
    workdir, variants = ablation_run
    results = workdir / "results"
    for name in variants:
        summary = json.loads((results / "eval" / name / "rb-like" / "summary.json").read_text())
        assert summary["n_pairs"] > 0 and 0 <= summary["accuracy"] <= 1, name
    configs = {name: json.loads((results / "reward" / name / "reward_model.json").read_text()) for name in variants}
    assert configs["sarm-finetuned"]["training"]["mode"] == "finetune"
    assert configs["sarm-joint"]["topk"] is False and configs["full-depth"]["format"] == "hf-sequence-classifier"
    assert configs["sarm-token-sae"]["sae_kind"] == "token" and configs["sarm-random-sae"]["sae_kind"] == "random"
    token_sae = json.loads((results / "sae" / "tiny-L2-token" / "metrics.json").read_text())
    assert token_sae["trained"]["corpus"] == "sampled token states of the training pairs"
    orderings = pd.read_csv(results / "tables" / "ablation_orderings.csv")
    expected = [
        "trained SAE encoder > random-init encoder",
        "sequence-level SAE > token-level SAE",
        "fine-tuned > frozen backbone",
        "SARM (truncated at L) >= a full-depth BT reward model",
    ]
    assert all(orderings["claim"].str.startswith(claim).any() for claim in expected)
    assert set(orderings["table"]) == {"val", "rb-like"} and orderings["verdict"].notna().all()
    assert configs["sparse-rm"]["format"] == "sarm-sparse-rm" and len(configs["sparse-rm"]["sparse_rm"]["latents"]) == 128
    assert not orderings[["winner_by_paper", "loser_by_paper"]].isin(["sparse-rm"]).any().any()  # no linear head
    assert configs["sarm-poe"]["training"]["length_debias"] == "poe" and "length_beta" in configs["sarm-poe"]["training"]
    gated = pd.read_parquet(results / "eval" / "sarm-multi" / "val" / "scores.parquet")
    # one objective per training category (the tiny config's: the data sets' names), each kept per example
    assert {"gate_hh-helpful_chosen", "objective_hh-harmless_rejected"} <= set(gated.columns)
    length_bias = pd.read_csv(results / "tables" / "length_bias.csv")
    assert set(length_bias["model"]) >= set(variants) and length_bias["pair_pearson"].notna().any()
    beside = pd.read_csv(results / "tables" / "variant_comparisons.csv")  # every variant beside the SARM head
    assert set(beside["variant"]) == set(variants) - {"sarm"} and set(beside["reference"]) == {"sarm"}
    assert set(beside["table"]) == {"val", "rb-like"}
    assert (beside["ci_low"] <= beside["difference"]).all() and (beside["difference"] <= beside["ci_high"]).all()


def test_explain_follows_explain_reward_model(ablation_run):
    """The cards and attributions are those of the model config key explain.reward_model names, and only its."""
    workdir, _ = ablation_run
    explain = workdir / "results" / "explain"
    assert [p.name for p in explain.iterdir()] == ["sarm-token-sae"]
    assert (explain / "sarm-token-sae" / "cards.html").stat().st_size > 0
    token_sae = json.loads((workdir / "results" / "reward" / "sarm-token-sae" / "reward_model.json").read_text())
    attributions = pd.read_parquet(explain / "sarm-token-sae" / "attributions" / "val.parquet")
    assert len(attributions) > 0 and token_sae["sae_kind"] == "token"


def test_shared_caches_and_sae(ablation_run):
    """Variants that share the model, layer or SAE share those outputs: one cache per table, one SAE per kind."""
    workdir, _ = ablation_run
    activations = workdir / "results" / "activations" / "tiny-L2"
    assert sorted(p.name for p in activations.iterdir()) == ["rb-like", "tokens", "train", "val"]
    assert sorted(p.name for p in (workdir / "results" / "sae").iterdir()) == ["tiny-L2", "tiny-L2-random", "tiny-L2-token"]


def test_comparisons_pair_models_that_differ_only_where_the_claim_says():
    specs = specs_from_config(
        {
            "reward_models": {
                "a": {"features": "sae"},
                "r": {"features": "sae", "sae": "random"},
                "fa": {"features": "sae", "mode": "finetune"},
                "fr": {"features": "sae", "sae": "random", "mode": "finetune"},
                "d": {"features": "hidden"},
            }
        }
    )
    found = {(claim.split(" (")[0], a, b) for claim, a, b in comparisons(specs)}
    assert ("trained SAE encoder > random-init encoder", "a", "r") in found
    assert ("trained SAE encoder > random-init encoder", "fa", "fr") in found
    assert ("trained SAE encoder > random-init encoder", "fa", "r") not in found  # different modes
    assert ("fine-tuned > frozen backbone", "fa", "a") in found and ("fine-tuned > frozen backbone", "fr", "a") not in found
    assert ("SARM head >= dense head on the same layer", "a", "d") in found


def test_verdicts():
    assert verdict(0.5, 0.4, 0.6) == "holds" and verdict(-0.5, -0.6, -0.4) == "reversed"
    assert verdict(0.02, -0.01, 0.05) == "holds (within noise)" and verdict(-0.02, -0.05, 0.01) == "reversed (within noise)"


def test_ordering_table_scores_are_the_category_mean():
    ids = list(range(4))

    def frame(chosen):
        return pd.DataFrame(
            {
                "id": ids,
                "subset": ["x", "x", "y", "y"],
                "category": ["x", "x", "y", "y"],
                "score_chosen": chosen,
                "score_rejected": [0.0] * 4,
            }
        )

    scores = {"a": {"t": frame([1.0, 1.0, 1.0, -1.0])}, "d": {"t": frame([1.0, -1.0, -1.0, -1.0])}}
    specs = specs_from_config({"reward_models": {"a": {"features": "sae"}, "d": {"features": "hidden"}}})
    row = ordering_table(scores, specs, draws=100).iloc[0]
    # a: x 2/2, y 1/2 -> 75 %; d: x 1/2, y 0/2 -> 25 %
    assert (row["score_winner"], row["score_loser"], row["difference"]) == (75.0, 25.0, 50.0)


def test_rewardbench2_orderings_use_the_official_score():
    """On RewardBench 2 the orderings compared pair accuracies, while Table 2 reports best-of-4 and Ties: here
    `a` wins 4 of 6 Math pairs but no prompt, `d` 2 of 6 pairs but a third of each prompt (3-way ties at the
    top); Ties is the same for both."""
    from sarm.rewardbench import summarize

    ties = {("Ties", "ref:1"): ([2.0], [1.0]), ("Ties", "tied:1"): ([2.0, 1.5], [1.0])}
    a = grouped_scores({("Math", "m1"): ([3.0], [1.0, 2.0, 4.0]), ("Math", "m2"): ([3.0], [1.0, 2.0, 4.0]), **ties})
    d = grouped_scores({("Math", "m1"): ([3.0], [3.0, 3.0, 0.0]), ("Math", "m2"): ([3.0], [3.0, 3.0, 0.0]), **ties})
    specs = specs_from_config({"reward_models": {"a": {"features": "sae"}, "d": {"features": "hidden"}}})
    row = ordering_table({"a": {"rb2": a}, "d": {"rb2": d}}, specs, draws=200).iloc[0]
    official = {name: 100 * summarize(t, name)["benchmark_scores"]["score"] for name, t in (("a", a), ("d", d))}
    assert (row["score_winner"], row["score_loser"]) == (round(official["a"], 1), round(official["d"], 1))
    assert row["score_winner"] < row["score_loser"] and row["verdict"].startswith("reversed")
    assert row["ci_low"] <= row["difference"] <= row["ci_high"]


def test_bad_reward_model_specs_name_the_key():
    with pytest.raises(SarmError, match="reward_models.d: sae and topk apply to features: sae only"):
        specs_from_config({"reward_models": {"d": {"features": "hidden", "topk": False}}})
    with pytest.raises(SarmError, match="reward_models.j.mode: joint trains an SAE"):
        specs_from_config({"reward_models": {"j": {"features": "hidden", "mode": "joint"}}})
    with pytest.raises(SarmError, match="reward_models.f: a full_depth model is a sequence classifier"):
        specs_from_config({"reward_models": {"f": {"mode": "full_depth", "sae": "token"}}})


def test_official_subsets_weigh_as_in_the_accuracy_tables():
    """Chat Hard of RewardBench v1: llmbar-natural counts 100, mt-bench-hard 37, whatever was sampled."""
    from sarm.intervals import category_mean_accuracy, pair_weights
    from sarm.rewardbench import category_scores, subset_table

    scores = pd.DataFrame(
        {
            "id": range(6),
            "subset": ["mt-bench-hard"] * 2 + ["llmbar-natural"] * 4,
            "category": ["Chat Hard"] * 6,
            "score_chosen": [1, 0, 1, 1, 1, 0],
            "score_rejected": [0, 1, 0, 0, 0, 1],
        }
    )
    correct = (scores["score_chosen"] > scores["score_rejected"]).to_numpy(float)
    expected = category_scores(subset_table(scores))["accuracy"].iloc[0]  # (0.5 x 37 + 0.75 x 100) / 137
    assert category_mean_accuracy(correct, scores["category"].to_numpy(), pair_weights(scores)) == pytest.approx(expected)
    assert expected == pytest.approx((0.5 * 37 + 0.75 * 100) / 137)
