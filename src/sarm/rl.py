"""RL against the reward model: GRPO (TRL) on a chat policy, then a before/after comparison and an audit.

- Prompts: MT-Bench and Arena-Hard `question.jsonl` files (`load_prompts`), the first user turn of each
  question; a seeded held-out split (`split_prompts`) that the policy never trains on.
- Reward: `RewardFunction` wraps a `sarm.reward.RewardModel` as a TRL reward function
  `(prompts, completions, **kwargs) -> list[float]`; a NaN reward stops the run with the step and prompt.
- Training: `train_policy` runs `trl.GRPOTrainer` (LoRA through peft, or full fine-tuning), logs reward, KL,
  completion length and loss (to wandb when `report_to` says so) and returns the log history.
- Evaluation: `evaluate_policies` generates greedily from the initial and the trained policy on held-out
  prompts, scores both with every judge, and `audit` lists the reward model's features whose mean
  contribution (w_i z_i at the final token) grew most: where a reward hack would show.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

from sarm.data import read_records
from sarm.errors import SarmError
from sarm.reward_model import RewardModel

log = logging.getLogger(__name__)

POLICIES = ("initial", "trained")
EXPECTED_FIELDS = "question_id and turns: MT-Bench turns = [str, ...], Arena-Hard turns = [{content: str}, ...]"


# --- prompts ---
def _first_turn(record: dict) -> str | None:
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        return None
    first = turns[0]
    if isinstance(first, dict):
        first = first.get("content")
    return first if isinstance(first, str) and first.strip() else None


def load_prompts(path: str | Path, source: str) -> pd.DataFrame:
    """One row per question of an MT-Bench or Arena-Hard `question.jsonl`: id (`<source>/<question_id>`),
    source, category, prompt (one user message; later MT-Bench turns refer to the first answer, so only the
    first turn is used). A record of another shape stops with the fields that were expected."""
    path = Path(path)
    if not path.exists():
        raise SarmError(f"prompt set {source!r}: {path} does not exist")
    rows = []
    for line, record in enumerate(read_records(path), start=1):
        text = _first_turn(record) if isinstance(record, dict) else None
        if text is None or "question_id" not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise SarmError(f"prompt set {source!r}: {path} record {line} has fields {found}; expected {EXPECTED_FIELDS}")
        rows.append(
            {
                "id": f"{source}/{record['question_id']}",
                "source": source,
                "category": str(record.get("category", source)),
                "prompt": [{"role": "user", "content": text}],
            }
        )
    if not rows:
        raise SarmError(f"prompt set {source!r}: {path} holds no records")
    return pd.DataFrame(rows)


def split_prompts(
    prompts: pd.DataFrame, heldout: int, seed: int, tokenizer=None, max_prompt_tokens: int | None = None
) -> pd.DataFrame:
    """Drop prompts longer than `max_prompt_tokens` chat-templated tokens (when a tokenizer is given), then
    hold out a seeded sample of `heldout` prompts; adds `n_prompt_tokens` and `split` (train / heldout)."""
    prompts = prompts.reset_index(drop=True).copy()
    if tokenizer is not None:
        prompts["n_prompt_tokens"] = [
            len(tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
            for p in prompts.prompt
        ]
        if max_prompt_tokens is not None:
            kept = prompts.n_prompt_tokens <= max_prompt_tokens
            log.info("prompts: kept %d of %d with at most %d prompt tokens", kept.sum(), len(prompts), max_prompt_tokens)
            prompts = prompts[kept].reset_index(drop=True)
    if heldout >= len(prompts):
        raise SarmError(f"config key rl.heldout: {heldout} held-out prompts leave none of the {len(prompts)} prompts to train on")
    order = np.random.default_rng(seed).permutation(len(prompts))
    prompts["split"] = "train"
    prompts.loc[order[:heldout], "split"] = "heldout"
    return prompts


# --- the reward function ---
def _text(completion) -> str:
    """A TRL completion: a string, or (conversational) a list of messages whose last one is the answer."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _preview(prompt, limit: int = 80) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


class RewardFunction:
    """A RewardModel as a TRL reward function. Conversational prompts go in as messages, completions as the
    generated assistant text; the scores are exactly `RewardModel.score(prompts, texts)`."""

    def __init__(self, model: RewardModel, name: str = "sarm", batch_size: int = 16):
        self.model, self.batch_size = model, batch_size
        self.__name__ = name  # TRL logs rewards/<name>/mean
        self.calls = 0

    def __call__(self, prompts: list, completions: list, trainer_state=None, id=None, **kwargs) -> list[float]:  # noqa: A002
        self.calls += 1
        step = trainer_state.global_step + 1 if trainer_state is not None else self.calls
        rewards = self.model.score(list(prompts), [_text(c) for c in completions], self.batch_size)
        bad = np.flatnonzero(~np.isfinite(rewards))
        if len(bad):
            i = int(bad[0])
            which = f"prompt {id[i]} " if id is not None else "prompt "
            raise SarmError(
                f"RL step {step}: reward model {self.__name__!r} gave {rewards[i]} for {which}{_preview(prompts[i])} "
                f"({len(bad)} of {len(rewards)} rewards not finite); the run is stopped"
            )
        return rewards.astype(float).tolist()


# --- training ---
def lora_config(settings: dict | None):
    if not settings:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"],
        task_type="CAUSAL_LM",
    )


def train_policy(
    policy: str | Path,
    reward: RewardFunction,
    prompts: pd.DataFrame,
    settings: dict,
    out_dir: str | Path,
    work_dir: str | Path,
    seed: int = 0,
    device: str = "cpu",
    report_to: str | list[str] = "none",
) -> pd.DataFrame:
    """GRPO on the `train` prompts; saves the policy (a LoRA adapter or the full model, with its tokenizer)
    to `out_dir` and returns one row of logged metrics per step (reward, kl, completions/mean_length,
    loss, ...)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    cuda = device.startswith("cuda")
    train = prompts[prompts.split == "train"]
    dataset = Dataset.from_list([{"prompt": list(p), "id": i} for p, i in zip(train.prompt, train.id)])
    config = GRPOConfig(
        output_dir=str(work_dir),
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["prompts_per_step"] * settings["num_generations"],
        gradient_accumulation_steps=1,
        num_generations=settings["num_generations"],
        max_completion_length=settings["max_completion_length"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="constant",
        beta=settings["beta"],
        temperature=settings["temperature"],
        use_vllm=settings["use_vllm"],
        gradient_checkpointing=settings["gradient_checkpointing"],
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        seed=seed,
        data_seed=seed,
        disable_dropout=True,
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings["lora"]),
        callbacks=[_LogSteps()],
    )
    trainer.train()
    out_dir = Path(out_dir)
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    (out_dir / "sarm_rl.json").write_text(
        json.dumps(
            {
                "base_policy": str(Path(policy).resolve()) if Path(policy).exists() else str(policy),
                "settings": settings,
                "seed": seed,
            },
            indent=2,
        )
    )
    return log_history(trainer.state.log_history)


class _LogSteps(TrainerCallback):
    """Each step's reward, KL, length and loss in the rule's log (TRL prints them only to stdout)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            log.info(
                "step %d/%d: reward %.4f  kl %.4g  length %.1f  loss %.4g",
                state.global_step,
                state.max_steps,
                logs["reward"],
                logs.get("kl", float("nan")),
                logs.get("completions/mean_length", float("nan")),
                logs.get("loss", float("nan")),
            )


def log_history(history: list[dict]) -> pd.DataFrame:
    """The per-step rows of a Trainer's log history (the final summary row has no reward)."""
    rows = [row for row in history if "reward" in row]
    return pd.DataFrame(rows)


def load_policy(path: str | Path, device: str = "cpu"):
    """A saved policy: a peft adapter folder (merged into its base model) or a full model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32).merge_and_unload()
    elif (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        raise SarmError(f"{path} is not a policy folder (no adapter_config.json or config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return model.to(device).eval(), tokenizer


# --- evaluation ---
@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 8) -> tuple[list[str], list[int]]:
    """Greedy completions of chat prompts; returns the texts and their lengths in tokens (up to and including
    the end-of-turn token, as TRL counts them)."""
    eos = {tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or []).tolist()}
    texts, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start : start + batch_size]]
        enc = tokenizer.apply_chat_template(
            batch, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        ).to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(eos),
        )[:, enc["input_ids"].shape[1] :]
        for row in out.tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
            lengths.append(end)
    return texts, lengths


def evaluate_policies(
    policies: dict[str, str | Path],
    prompts: pd.DataFrame,
    judges: dict[str, RewardModel],
    audited: str,
    max_new_tokens: int,
    batch_size: int = 8,
    device: str = "cpu",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Completions of every policy on the held-out prompts with each judge's score, and the mean feature
    contributions of the `audited` judge per policy (a frame: feature x policy)."""
    heldout = prompts[prompts.split == "heldout"].reset_index(drop=True)
    frames = []
    for name, path in policies.items():
        model, tokenizer = load_policy(path, device)
        texts, lengths = generate(model, tokenizer, list(heldout.prompt), max_new_tokens, batch_size)
        del model
        frames.append(
            heldout[["id", "source", "category", "prompt"]].assign(
                policy=name, completion=texts, n_tokens=lengths, clipped=[n >= max_new_tokens for n in lengths]
            )
        )
    completions = pd.concat(frames, ignore_index=True)
    contributions = {}
    for judge, model in judges.items():
        hidden = model.hidden(list(completions.prompt), list(completions.completion), batch_size)
        completions[f"score_{judge}"] = model.score_hidden(hidden).numpy()
        if judge == audited:
            features = model.features(hidden)
            contrib = model.contributions(features)
            for name in policies:
                rows = torch.tensor((completions.policy == name).to_numpy())
                contributions[name] = contrib[rows].mean(0).numpy()
                contributions[f"active_{name}"] = (features[rows] != 0).float().mean(0).numpy()
            contributions["weight"] = model.weight.numpy()
    return completions, pd.DataFrame(contributions).rename_axis("feature").reset_index()


def win_rate(a: np.ndarray, b: np.ndarray, same: np.ndarray | None = None) -> float:
    """% of prompts where a scores higher than b; a tie (equal scores up to batching noise, or the same
    completion text where `same` says so) counts half."""
    tie = np.isclose(a, b, rtol=0, atol=1e-4) | (same if same is not None else False)
    return float(100 * (((a > b) & ~tie).mean() + 0.5 * tie.mean()))


def before_after(completions: pd.DataFrame, judges: list[str]) -> pd.DataFrame:
    """One row per prompt source and `all`: the trained policy's win rate over the initial one under each
    judge, both policies' mean scores, mean completion length and % of completions cut at the limit."""
    wide = completions.pivot(index="id", columns="policy")
    source = wide["source"]["initial"]
    rows = []
    for group, ids in [*((s, source.index[source == s]) for s in sorted(source.unique())), ("all", source.index)]:
        w = wide.loc[ids]
        row = {"prompts": group, "n": len(ids)}
        for judge in judges:
            s = w[f"score_{judge}"]
            same = (w["completion"]["trained"] == w["completion"]["initial"]).to_numpy()
            row[f"{judge} win rate (%)"] = round(win_rate(s["trained"].to_numpy(float), s["initial"].to_numpy(float), same), 1)
            row[f"{judge} initial"] = round(float(s["initial"].mean()), 3)
            row[f"{judge} trained"] = round(float(s["trained"].mean()), 3)
        for name in POLICIES:
            row[f"length {name}"] = round(float(w["n_tokens"][name].mean()), 1)
        for name in POLICIES:
            row[f"clipped {name} (%)"] = round(float(100 * w["clipped"][name].astype(float).mean()), 1)
        row["same completion (%)"] = round(float(100 * (w["completion"]["trained"] == w["completion"]["initial"]).mean()), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def audit(contributions: pd.DataFrame, top: int) -> pd.DataFrame:
    """The `top` features whose mean contribution grew most from the initial to the trained policy."""
    table = contributions.assign(delta=contributions.trained - contributions.initial)
    table = table.sort_values("delta", ascending=False, kind="stable").head(top)
    out = pd.DataFrame(
        {
            "feature": table.feature,
            "weight": table.weight.round(4),
            "contribution initial": table.initial.round(4),
            "contribution trained": table.trained.round(4),
            "growth": table.delta.round(4),
            "active initial (%)": (100 * table.active_initial).round(1),
            "active trained (%)": (100 * table.active_trained).round(1),
        }
    )
    return out.reset_index(drop=True)


CURVES = {
    "reward": "reward (mean)",
    "kl": "KL to the initial policy",
    "completions/mean_length": "completion length (tokens)",
    "loss": "loss",
}


def curves_figure(history: pd.DataFrame, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in CURVES if k in history]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        ax.plot(history["step"], history[key], lw=0.8, alpha=0.5)
        window = max(1, len(history) // 10)
        ax.plot(history["step"], history[key].rolling(window, min_periods=1).mean(), lw=1.8)
        ax.set_title(CURVES[key])
        ax.set_xlabel("step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_ends(history: pd.DataFrame, window: int = 5) -> dict:
    """Mean of the first and last `window` steps of reward, KL and length (for logs and notes)."""
    return {
        key: {"start": float(history[key].head(window).mean()), "end": float(history[key].tail(window).mean())}
        for key in CURVES
        if key in history and not math.isnan(history[key].mean())
    }
