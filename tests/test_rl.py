"""GRPO against the reward model: prompt loaders on the real files, the reward adapter, a two-step GRPO run
on the tiny model with a tiny SARM as reward, the before/after evaluation and the `rl` target's DAG."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from sarm import rl
from sarm.errors import SarmError
from sarm.reward_model import RewardModel

SETTINGS = {
    "steps": 2,
    "prompts_per_step": 2,
    "num_generations": 2,
    "max_completion_length": 8,
    "learning_rate": 0.01,
    "beta": 0.04,
    "temperature": 1.0,
    "use_vllm": False,
    "gradient_checkpointing": False,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
}


@pytest.fixture(scope="module")
def prompts(shared_data):
    return pd.concat(
        [
            rl.load_prompts(shared_data / "prompts/mt_bench/question.jsonl", "mt_bench"),
            rl.load_prompts(shared_data / "prompts/arena-hard-v0.1/question.jsonl", "arena_hard"),
        ],
        ignore_index=True,
    )


def test_prompt_loaders_read_both_real_shapes(prompts, shared_data):
    counts = prompts.source.value_counts()
    assert counts["mt_bench"] == 80 and counts["arena_hard"] == 500
    first_mt = json.loads((shared_data / "prompts/mt_bench/question.jsonl").read_text().splitlines()[0])
    first_ah = json.loads((shared_data / "prompts/arena-hard-v0.1/question.jsonl").read_text().splitlines()[0])
    mt = prompts.set_index("id").loc[f"mt_bench/{first_mt['question_id']}"]
    ah = prompts.set_index("id").loc[f"arena_hard/{first_ah['question_id']}"]
    assert mt.prompt == [{"role": "user", "content": first_mt["turns"][0]}] and mt.category == first_mt["category"]
    assert ah.prompt == [{"role": "user", "content": first_ah["turns"][0]["content"]}]
    assert prompts.id.is_unique


def test_prompt_file_of_unknown_shape_names_the_expected_fields(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text('{"question_id": 1, "turns": ["fine"]}\n{"instruction": "Write a poem.", "output": "x"}\n')
    with pytest.raises(SarmError, match=r"record 2 has fields \['instruction', 'output'\]; expected question_id and turns"):
        rl.load_prompts(path, "mine")
    with pytest.raises(SarmError, match="prompt set 'mine'.*does not exist"):
        rl.load_prompts(tmp_path / "missing.jsonl", "mine")


def test_heldout_split_is_seeded_disjoint_and_filters_long_prompts(prompts, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = rl.split_prompts(prompts, 20, seed=0, tokenizer=tokenizer, max_prompt_tokens=128)
    b = rl.split_prompts(prompts, 20, seed=0, tokenizer=tokenizer, max_prompt_tokens=128)
    c = rl.split_prompts(prompts, 20, seed=1, tokenizer=tokenizer, max_prompt_tokens=128)
    assert (a.split == "heldout").sum() == 20 and a.equals(b)
    assert set(a.id[a.split == "heldout"]) != set(c.id[c.split == "heldout"])
    assert a.n_prompt_tokens.max() <= 128 and 100 < len(a) < len(prompts)  # long Arena-Hard prompts dropped
    with pytest.raises(SarmError, match="config key rl.heldout: 580 held-out prompts leave none"):
        rl.split_prompts(prompts, 580, seed=0)


def test_reward_function_scores_like_the_reward_model(trained):
    root, val_pairs, _ = trained
    model = RewardModel.from_pretrained(root / "rm")
    prompts = [list(p) for p in val_pairs.prompt]
    texts = list(val_pairs.chosen)
    reward = rl.RewardFunction(model, "tiny-sarm")
    conversational = reward(prompts, [[{"role": "assistant", "content": t}] for t in texts])
    expected = model.score(prompts, texts)
    np.testing.assert_allclose(conversational, expected, atol=1e-5, rtol=0)
    assert isinstance(conversational, list) and np.std(conversational) > 0
    plain = reward([p[-1]["content"] for p in prompts], texts)  # a string prompt is one user message
    np.testing.assert_allclose(plain, model.score([p[-1]["content"] for p in prompts], texts), atol=1e-5, rtol=0)


def test_nan_reward_names_the_step_and_the_prompt(trained):
    root, val_pairs, _ = trained
    model = RewardModel.from_pretrained(root / "rm")
    model.weight[:] = float("nan")
    reward = rl.RewardFunction(model, "tiny-sarm")
    prompt = list(val_pairs.prompt[0])
    with pytest.raises(SarmError, match=r"RL step 7: reward model 'tiny-sarm' gave nan for prompt mt_bench/81 '") as err:
        reward(
            [prompt], [[{"role": "assistant", "content": "hi"}]], trainer_state=SimpleNamespace(global_step=6), id=["mt_bench/81"]
        )
    assert prompt[-1]["content"][:20] in str(err.value) and "\n" not in str(err.value)


def test_win_rate_by_hand():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.00001, 5.0, 3.0])
    assert rl.win_rate(a, b) == 62.5  # win, tie (within batching noise), loss, win
    assert rl.win_rate(a, b, same=np.array([False, False, False, True])) == 50.0  # same text: a tie


@pytest.fixture(scope="module")
def grpo_run(trained, tiny_model_dir, prompts, tmp_path_factory):
    """Two GRPO steps: the tiny model as policy, the tiny SARM as reward (LoRA)."""
    root = tmp_path_factory.mktemp("grpo")
    split = rl.split_prompts(prompts.iloc[::40], 3, seed=0)  # 15 prompts: 12 train, 3 held out
    reward = rl.RewardFunction(RewardModel.from_pretrained(trained[0] / "rm"), "tiny-sarm")
    history = rl.train_policy(tiny_model_dir, reward, split, SETTINGS, root / "policy", root / "work")
    return root, split, history


def test_grpo_logs_reward_kl_length_and_loss_and_saves_a_loadable_policy(grpo_run, tiny_model_dir):
    root, _, history = grpo_run
    assert history.step.tolist() == [1, 2]
    for key in ("reward", "kl", "completions/mean_length", "loss", "rewards/tiny-sarm/mean"):
        assert history[key].notna().all(), key
    assert (history["completions/mean_length"] <= SETTINGS["max_completion_length"]).all()
    assert (root / "policy" / "adapter_config.json").exists()
    policy, tokenizer = rl.load_policy(root / "policy")
    base, _ = rl.load_policy(tiny_model_dir)
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(policy(ids).logits, base(ids).logits)  # the adapter moved the policy
    texts, lengths = rl.generate(policy, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=5)
    assert len(texts) == 1 and 1 <= lengths[0] <= 5


def test_nan_reward_stops_the_grpo_run(trained, tiny_model_dir, prompts, tmp_path):
    model = RewardModel.from_pretrained(trained[0] / "rm")
    model.weight[:] = float("nan")
    split = rl.split_prompts(prompts.iloc[:6], 2, seed=0)
    with pytest.raises(SarmError, match=r"RL step 1: .* for prompt mt_bench/\d+ '"):
        rl.train_policy(tiny_model_dir, rl.RewardFunction(model), split, {**SETTINGS, "steps": 1}, tmp_path / "p", tmp_path / "w")


def test_before_after_tables_and_audit(grpo_run, trained, tiny_model_dir, tmp_path):
    root, split, history = grpo_run
    judges = {"sarm": RewardModel.from_pretrained(trained[0] / "rm")}
    # the same policy twice: every comparison is a tie and no contribution grows
    same, contrib = rl.evaluate_policies({"initial": tiny_model_dir, "trained": tiny_model_dir}, split, judges, "sarm", 6)
    table = rl.before_after(same, ["sarm"])
    assert table.prompts.iloc[-1] == "all" and table.n.iloc[-1] == 3
    assert (table["sarm win rate (%)"] == 50.0).all() and (table["same completion (%)"] == 100.0).all()
    assert rl.audit(contrib, 5).growth.abs().max() < 1e-3  # batching noise only
    # the trained policy: scores per judge and policy, and the audit's contributions sum to the mean reward
    completions, contrib = rl.evaluate_policies({"initial": tiny_model_dir, "trained": root / "policy"}, split, judges, "sarm", 6)
    assert len(completions) == 6 and set(completions.policy) == {"initial", "trained"}
    for name in ("initial", "trained"):
        mean_score = completions.loc[completions.policy == name, "score_sarm"].mean()
        assert contrib[name].sum() == pytest.approx(mean_score, abs=1e-4)
    features = rl.audit(contrib, 5)
    assert len(features) == 5 and features.growth.is_monotonic_decreasing
    rl.curves_figure(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert set(rl.curve_ends(history)) == {"reward", "kl", "completions/mean_length", "loss"}


def test_rl_target_is_wired_and_checks_its_config(tiny_model_dir, shared_data, tmp_path):
    from test_workflow import snakemake, tiny_config

    config = tiny_config(tiny_model_dir, shared_data)
    config["rl"] = {"prompts": {"mt_bench": str(shared_data / "prompts/mt_bench/question.jsonl")}, "steps": 2}
    result = snakemake(tmp_path / "ok", config, "-n", "rl")
    assert result.returncode == 0, result.stderr[-3000:]
    for rule in ("rl_prompts", "rl_train", "rl_evaluate", "rl_tables"):
        assert f"rule {rule}:" in result.stdout, rule
    # a real job: the policy param comes from the rule's input (the fetched base model) and its tokenizer reads it
    result = snakemake(tmp_path / "ok", config, "results/rl/sarm/prompts.parquet")
    assert result.returncode == 0, result.stderr[-3000:]
    prompts = pd.read_parquet(tmp_path / "ok/results/rl/sarm/prompts.parquet")
    assert set(prompts["split"]) == {"train", "heldout"} and (prompts["source"] == "mt_bench").all()
    result = snakemake(tmp_path / "all", config, "-n")
    assert "rl_train" not in result.stdout  # the default target leaves RL out
    config["rl"]["reward"] = "length"
    result = snakemake(tmp_path / "bad", config, "-n", "rl")
    assert (
        result.returncode != 0
        and "config key rl.reward: 'length' is not a trained SARM or dense-head reward model" in result.stdout + result.stderr
    )
