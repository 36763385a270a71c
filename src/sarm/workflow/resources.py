"""Each rule's resources, computed from the experiment: what one job of a rule asks the scheduler for.

`estimate(rule, config, shape, ...)` returns the host memory (`mem_mb`), wall time (`runtime`, minutes), GPU count
(`gpu`) and an informative GPU-memory figure (`gpu_mem_mb`) of one job. The sizes come from `sarm.cluster` (the
model's shape, the tables' pairs, the planning constants); a reward model's training and scoring cost from its
spec (`sarm.variants`). A retried job (SLURM killed it for time or memory) asks for `attempt` x the first request.
"""

from __future__ import annotations

import math

from sarm.cluster import (
    AVG_TOKENS_CAP,
    BASE_MB,
    CPU_TFLOPS_PER_THREAD,
    GPU_TFLOPS,
    RL_OVERHEAD_MB,
    SENTENCES_PER_SEQUENCE,
    SETUP_MINUTES,
    Shape,
    sae_shape,
    table_pairs,
    weight_bytes,
)
from sarm.cluster import (
    mb as _mb,
)
from sarm.variants import RewardModelSpec, specs_from_config

GPU_RULES = {"cache_activations", "cache_bon", "sae", "rl_train", "rl_evaluate"}  # on a GPU when device is not cpu
REWARD_RULES = {"train_reward", "finetune_reward"}  # on a GPU when the spec trains end to end


def reward_spec(config: dict, rm: str | RewardModelSpec | None) -> RewardModelSpec:
    """A reward model's spec: given, or by name from the config as given (default: `sarm`)."""
    if isinstance(rm, RewardModelSpec):
        return rm
    return specs_from_config(config)[rm or "sarm"]


def uses_gpu(rule: str, config: dict, rm: str | RewardModelSpec | None = None) -> bool:
    """Whether a job of `rule` runs on a GPU: the GPU rules, a reward model trained end to end, and evaluation of
    one scored from its text."""
    if config["device"] == "cpu":
        return False
    if rule in REWARD_RULES:
        return not reward_spec(config, rm).trains_on_cache
    if rule == "evaluate":
        return rm is not None and not reward_spec(config, rm).scored_from_cache
    return rule in GPU_RULES


def _round_up(mb: float, step: int = 1000) -> int:
    return int(math.ceil(mb / step) * step)


def _minutes(flops: float, gpu: bool, threads: int) -> float:
    rate = GPU_TFLOPS if gpu else CPU_TFLOPS_PER_THREAD * max(1, threads)
    return flops / (rate * 1e12) / 60


def _eval_tables(config: dict) -> list[str]:
    return ["val", *config["eval"]["datasets"]]


def _explain_table(config: dict) -> str:
    """workflow/rules/common.smk's EXPLAIN_TABLE: the cards' evaluation table."""
    return config["explain"]["table"] or (config["eval"]["datasets"] or ["val"])[0]


# The interpretability and best-of-N rules that read SAE latents of cached tables: rule -> the tables one job reads.
READ_LATENTS = {
    "attributions": lambda config, table: [table or "val"],
    "feature_stats": lambda config, table: [_explain_table(config)],
    "preference_shift": lambda config, table: _eval_tables(config),
    "bon_scores": lambda config, table: ["bon"],
}


def estimate(
    rule: str,
    config: dict,
    shape: Shape,
    table: str | None = None,
    rm: str | RewardModelSpec | None = None,
    attempt: int = 1,
    threads: int = 8,
) -> dict:
    """Resources of one job of `rule` (see the module docstring); `table` is its wildcard, `rm` its reward model
    (a spec, or a name in config key reward_models)."""
    model = config["model"]
    gpu = uses_gpu(rule, config, rm)
    h = shape.hidden_size
    width, _ = sae_shape(config, h)
    if rule in ("cache_activations", "cache_bon"):
        b = weight_bytes(model, "cuda" if gpu and config["device"] != "auto" else "cpu")
        weights = shape.loaded_b * 1e9 * b
        # forward activations of one batch: residual, attention and MLP intermediates (~24 h-wide fp32 copies)
        act = model["batch_size"] * model["max_length"] * h * 4 * 24
        shard = 1024 * (1 + SENTENCES_PER_SEQUENCE) * h * 4  # the 1024-sequence shard being written
        host = BASE_MB + _mb(1.25 * weights + shard + (0 if gpu else act))
        gpu_mem = _mb(weights + act) if gpu else 0
        sequences = 2 * table_pairs(config, table or "train")
        tokens = sequences * min(model["max_length"], AVG_TOKENS_CAP)
        flops = 2 * shape.loaded_b * 1e9 * tokens
    elif rule == "sae":
        samples = config["sae"]["training_samples"]
        sae_params = 2 * h * width
        buffer = 65536 * h * 4 * 3  # sae.shuffled_batches: the shuffle pool, its permuted copy, one shard
        val_pairs = table_pairs(config, "val")
        val = 2 * val_pairs * SENTENCES_PER_SEQUENCE * h * 4 * 2  # held-out metrics: all val vectors, concatenated
        state = sae_params * 4 * (2 if gpu else 4)  # host copies when saved/re-loaded; + grads, Adam on a CPU
        host = BASE_MB + _mb(buffer + val + state)
        gpu_mem = _mb(sae_params * 4 * 4 + config["sae"]["batch_size"] * width * 4 * 4) if gpu else 0
        flops = samples * 6 * 2 * h * width  # encoder + decoder, forward + backward
    elif rule in REWARD_RULES or rule == "evaluate":
        spec = reward_spec(config, rm)
        cost = (
            spec.training_cost(config, shape, gpu)
            if rule in REWARD_RULES
            else spec.scoring_cost(config, shape, table or "val", gpu)
        )
        host, gpu_mem, flops = cost.host_mb, cost.gpu_mem_mb, cost.flops
    elif rule in ("rl_train", "rl_evaluate"):
        rl = config["rl"]
        policy = shape.params_b * 1e9  # the base model unless rl.policy names another (sized alike)
        completions = rl["prompts_per_step"] * rl["num_generations"]
        tokens = completions * (rl["max_completion_length"] + (rl["max_prompt_tokens"] or 512))
        full = rl["lora"] is None
        states = policy * (16 if full else 0.02 * 16)  # AdamW on every weight, or on LoRA adapters (~2 %)
        reference = policy * 2 if rl["beta"] else 0
        reward = shape.loaded_b * 1e9 * 2
        if rule == "rl_train":
            # per step: sampling (2 x params x completion tokens, token by token) + policy update (6 x params x tokens)
            flops = rl["steps"] * (
                2 * policy * completions * rl["max_completion_length"] * 4 + 6 * policy * tokens + 2 * reward / 2 * tokens
            )
            device_mem = policy * (4 if full else 2) + states + reference + reward
        else:
            prompts = rl["heldout"] * 2  # before and after
            flops = 2 * policy * prompts * rl["max_completion_length"] * 4 + 2 * reward / 2 * prompts * rl[
                "max_completion_length"
            ] * len(config.get("reward_models") or [1, 1])
            device_mem = policy * 2 + reward
        act = completions * (rl["max_completion_length"] + 512) * h * 4 * shape.num_hidden_layers
        # + TRL/peft and generation buffers: the default's rl_train peaked at 5.8 GB on the CPU
        host = BASE_MB + RL_OVERHEAD_MB + _mb(policy * 4 * 1.25 + (0 if gpu else device_mem + act))
        gpu_mem = _mb(device_mem + act) if gpu else 0
    elif rule in READ_LATENTS:
        # dense SAE latents of every sequence of the largest table read, plus their contributions (or firing
        # masks) and the hidden states: 11k RewardBench 2 sequences x 65,536 latents are 2.9 GB a copy
        tables = READ_LATENTS[rule](config, table)
        sequences = 2 * max(table_pairs(config, t) for t in tables)
        host = BASE_MB + _mb(sequences * (width + h) * 4 * 3)
        gpu_mem = 0
        flops = sequences * h * width * 2 * len(tables)
        if rule == "feature_stats":  # + the cards' corpus contexts: every sentence-final state of train, encoded
            flops += 2 * table_pairs(config, "train") * SENTENCES_PER_SEQUENCE * h * width * 2
    elif rule == "token_rewards":  # a handful of responses scored from text on the CPU, the head read at every token
        tokens = 2 * config["explain"]["token_rewards"]["n_pairs"] * model["max_length"]
        weights = shape.loaded_b * 1e9 * weight_bytes(model, "cpu")
        host = BASE_MB + _mb(1.25 * weights + tokens * (width + h) * 4 * 3)
        gpu_mem = 0
        flops = 2 * shape.loaded_b * 1e9 * tokens + tokens * h * width * 2
    else:
        raise ValueError(f"no resource model for rule {rule!r}")
    runtime = SETUP_MINUTES + 2 * _minutes(flops, gpu, threads)
    n_gpus = (cost.gpus if rule in REWARD_RULES else 1) if gpu else 0
    return {
        "mem_mb": _round_up(host) * attempt,
        "runtime": int(math.ceil(runtime / 5) * 5) * attempt,
        "gpu": n_gpus,
        "gpu_mem_mb": _round_up(gpu_mem) if gpu else 0,
    }
