"""Reward models trained end to end on token ids, with transformers' Trainer (bf16, gradient checkpointing,
cosine schedule with warm-up, gradient accumulation to a global batch; multi-GPU through accelerate/torchrun).

The kinds trained here (`finetune`, `joint`, `full_depth`, ...) are `sarm.variants` specs; each builds the module
trained (`RewardModelSpec.build_trainable`): `SarmForReward` (layers 1..L -> standardise -> SAE latents or the
hidden state -> head) or `ClassifierForReward` (a full-depth sequence classifier). Every model reads its reward at the final token of the chat-templated prompt + response, as the cached path does.

Several processes (data parallel): the rule's script writes the job's arguments to JSON and starts
`torchrun --nproc_per_node N -m sarm.finetune job.json` (`sarm.cluster.launch_command`): one process per GPU
(NCCL, `finetune.gpus`) or, without GPUs, `finetune.cpu_processes` CPU processes (gloo), the same code either
way. Each run writes `ranks.json`: the world size, backend and the pair ids each rank trained on.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sae_lens.saes.topk_sae import TopK
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from sarm import activations, checkpoints, models
from sarm.cluster import training_memory_mb
from sarm.errors import SarmError
from sarm.length_debias import length_debias, response_tokens
from sarm.reward import bt_loss, bt_margin_loss
from sarm.reward_model import (
    CLASSIFIER_FORMAT,
    CONFIG_FILE,
    RewardModel,
    _final_states,
    base_model_config,
    classifier_rewards,
    model_config,
    set_topk,
)
from sarm.variants import RewardModelSpec, spec_from_dict

log = logging.getLogger(__name__)

BACKBONE_DIR = "backbone"
ADAM_BYTES_PER_PARAM = 16  # fp32 weight + gradient + two Adam moments


# --- data: tokenised pairs, padded per batch ---


class PairDataset(torch.utils.data.Dataset):
    """Token ids of each pair's chosen and rejected conversation, tokenised as the cached path tokenises them."""

    def __init__(self, tokenizer, pairs: pd.DataFrame, max_length: int):
        self.items = [
            (
                activations.encode(tokenizer, row.prompt, row.chosen, max_length),
                activations.encode(tokenizer, row.prompt, row.rejected, max_length),
            )
            for row in pairs.itertuples(index=False)
        ]
        self.n_tokens = int(sum(len(c.input_ids) + len(r.input_ids) for c, r in self.items))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        chosen, rejected = self.items[i]
        return {
            "chosen": chosen.input_ids,
            "rejected": rejected.input_ids,
            "index": i,
            "chosen_start": chosen.response_start,
            "rejected_start": rejected.response_start,
        }


class PairCollator:
    """Right-pads a batch of pairs into one [2B, T] batch: rows 0..B-1 chosen, B..2B-1 rejected; `pair_index`
    (the pairs' rows in their table) says which rows a process trained on; `response_mask` marks each row's
    last assistant turn, from its first content token to the end-of-turn token (the joint mode's reconstruction)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        sequences = [item["chosen"] for item in items] + [item["rejected"] for item in items]
        starts = [item["chosen_start"] for item in items] + [item["rejected_start"] for item in items]
        ids, mask = activations.pad_right(sequences, self.pad_id)
        response = mask.clone()
        for row, start in enumerate(starts):
            response[row, :start] = 0
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "response_mask": response,
            "pair_index": torch.tensor([item["index"] for item in items]),
        }


# --- the trainable models ---


class _PairReward(nn.Module):
    """What the trained modules share: `length_debias`, the length term of their loss in training (set by
    `with_length_debias`; none in evaluation, where the loss is the head's BT alone)."""

    def __init__(self):
        super().__init__()
        self.length_debias = None

    def _length_term(self):
        return self.length_debias if self.training else None


class SarmForReward(_PairReward):
    """Truncated LM (layers 1..L) -> standardise -> SAE latents (or the hidden state) -> head, no bias."""

    def __init__(self, backbone, head_size: int, sae=None, train_sae: bool = False, recon_weight: float = 0.0):
        super().__init__()
        self.backbone, self.sae, self.recon_weight = backbone, sae, recon_weight
        self.head = nn.Linear(head_size, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        self.backbone.requires_grad_(True)
        if sae is not None:
            sae.requires_grad_(train_sae)

    def activation_checkpointing_enable(self, **kwargs):
        self.backbone.activation_checkpointing_enable(**kwargs)

    def forward(self, input_ids, attention_mask, response_mask=None):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        x = activations.standardize(_final_states(hidden, attention_mask))
        if self.sae is None:
            features, recon = x, None
        else:
            dtype = _stored_dtype(self.sae.W_enc)
            with _computing_in(dtype, x.device):  # sae-lens casts its input to its config's dtype (fp32)
                features = self.sae.encode(x.to(dtype)).float()
                recon = self._reconstruction(hidden, response_mask, dtype) if self.recon_weight else None
        rewards = self.head(features.to(_stored_dtype(self.head.weight))).squeeze(-1).float()
        return _bt_outputs(rewards, recon, self.recon_weight, self._length_term(), response_mask)

    def _reconstruction(self, hidden: torch.Tensor, response_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The public recipe's reconstruction loss (its `sarm_train_mode=3`): the SAE, TopK on, reconstructs the
        detached standardised states of every token of each sequence's last assistant turn; the per-token
        normalised MSE ||x_hat - x||^2 / ||x||^2 is averaged over a sequence's tokens, then over the sequences.
        Only the SAE learns from it (the states are detached)."""
        if response_mask is None:
            raise SarmError("the joint mode's reconstruction loss needs the batch's response_mask (PairCollator)")
        rows, cols = response_mask.nonzero(as_tuple=True)
        x = activations.standardize(hidden[rows, cols].detach())
        latents = self.sae.encode(x.to(dtype))
        if not isinstance(self.sae.activation_fn, TopK):  # TopK off for the head: still on for the reconstruction
            latents = TopK(self.sae.cfg.k)(latents)
        x_hat = self.sae.decode(latents).float()
        per_token = ((x_hat - x) ** 2).mean(-1) / (x**2).mean(-1).clamp_min(1e-6)
        per_sequence = torch.zeros(len(hidden), device=x.device).index_add_(0, rows, per_token)
        return (per_sequence / response_mask.sum(-1).clamp_min(1)).mean()


class ClassifierForReward(_PairReward):
    """A full-depth AutoModelForSequenceClassification whose score is read at the final real token."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def activation_checkpointing_enable(self, **kwargs):
        self.classifier.activation_checkpointing_enable(**kwargs)

    def forward(self, input_ids, attention_mask, response_mask=None):
        rewards = classifier_rewards(self.classifier, input_ids, attention_mask)
        return _bt_outputs(rewards, None, 0.0, self._length_term(), response_mask)


def _stored_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype a parameter computes in: under DeepSpeed ZeRO-3 the visible tensor is an fp32 placeholder and
    the gathered weights take the dtype of the rank's shard (`ds_tensor`, bf16 when bf16 is on)."""
    return getattr(param, "ds_tensor", param).dtype


def _computing_in(dtype: torch.dtype, device: torch.device):
    """Matrix products in `dtype` when the weights are held in a lower precision than fp32 (ZeRO-3 with bf16);
    otherwise no change, so an enclosing autocast (bf16 over fp32 weights) stays in force."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def _bt_outputs(rewards: torch.Tensor, recon, recon_weight: float, debias=None, response_mask=None) -> dict:
    """The batch's loss (rows 0..B-1 chosen, B..2B-1 rejected): BT, with `debias` its length-debiased form (the
    lengths: the rows' response token counts), plus recon_weight x the reconstruction loss."""
    half = len(rewards) // 2
    if debias is None:
        loss = bt_loss(rewards[:half], rewards[half:])
    else:
        if response_mask is None:
            raise SarmError("a length-debiased loss needs the batch's response_mask (PairCollator)")
        lengths = response_mask.sum(-1).float()
        loss = debias(rewards[:half] - rewards[half:], lengths[:half] - lengths[half:], bt_margin_loss)
    if recon is not None:
        loss = loss + recon_weight * recon
    return {"loss": loss, "rewards": rewards.detach()}


# --- training ---


HEAD_PARAMETERS = ("head.", "classifier.score.", "length_debias.")  # trained at finetune.head_lr


class _BTTrainer(Trainer):
    """Trainer with a separate learning rate for the head (zero-initialised, it needs a larger one on short runs;
    the length term's beta, zero-initialised too, with it);
    `seen` keeps the table rows of the pairs this process trained on, in order."""

    head_lr: float | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen.extend(inputs.pop("pair_index").tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            head = [p for n, p in named if n.startswith(HEAD_PARAMETERS)]
            rest = [p for n, p in named if not n.startswith(HEAD_PARAMETERS)]
            groups = [{"params": rest, "lr": self.args.learning_rate}]
            groups.append({"params": head, "lr": self.head_lr or self.args.learning_rate})
            self.optimizer = torch.optim.AdamW(groups, weight_decay=self.args.weight_decay)
        return self.optimizer

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != "pair_index"}
        with torch.no_grad(), self.autocast_smart_context_manager():
            outputs = model(**self._prepare_inputs(inputs))
        rewards = outputs["rewards"]
        half = len(rewards) // 2
        # predictions [pairs, 2] = (chosen, rejected); Trainer computes metrics only when labels exist
        return outputs["loss"].detach(), torch.stack([rewards[:half], rewards[half:]], 1), torch.ones(half)


def _pair_accuracy(prediction) -> dict:
    """Validation pair accuracy from the [pairs, 2] (chosen, rejected) rewards of `prediction_step`."""
    rewards = np.asarray(prediction.predictions)
    return {"accuracy": float((rewards[:, 0] > rewards[:, 1]).mean())}


class _FaultPoint(TrainerCallback):
    """Tests' SIGKILL point (checkpoints.fault_point) at the start of each epoch after the first: the previous
    epoch's checkpoint is complete by then. `finetune-rank<R>` kills only rank R of several processes."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = round(state.epoch) + 1
        checkpoints.fault_point("finetune", epoch)
        checkpoints.fault_point(f"finetune-rank{os.environ.get('RANK', '0')}", epoch)


class _History(TrainerCallback):
    """Keeps the Trainer's log lines (loss, learning rate, eval accuracy) and forwards them, e.g. to wandb."""

    def __init__(self, log=None):
        self.rows, self.log = [], log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            row = {"step": state.global_step, "epoch": state.epoch, **logs}
            self.rows.append(row)
            if self.log:
                self.log(row)


def estimate_memory_mb(
    n_params: int, n_trainable: int, sequences: int, length: int, config, checkpointing: bool, on_gpu: bool, shards: int = 1
) -> int:
    """`cluster.training_memory_mb` for a model config (hidden size, layers, heads): the job's resource request
    and this check before training use the one memory model."""
    return training_memory_mb(
        n_params,
        n_trainable,
        sequences,
        length,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        checkpointing,
        on_gpu,
        shards,
    )


def check_fits(estimate_mb: int, available_mb: int | None, where: str) -> None:
    if available_mb and estimate_mb > available_mb:
        raise SarmError(
            f"fine-tuning needs about {estimate_mb:,} MB on the {where} but {available_mb:,} MB are declared; "
            "lower finetune.per_device_batch_size or model.max_length, turn on finetune.gradient_checkpointing or "
            "finetune.zero3 (several GPUs), or give the rule more memory (resources mem_mb / a larger GPU)"
        )


def zero3_config(hidden_size: int) -> dict:
    """DeepSpeed ZeRO-3 for transformers' Trainer (the paper's multi-GPU setup): parameters, gradients and
    AdamW states sharded over the job's processes; batch, clipping and bf16 ("auto") come from the
    TrainingArguments; the weights are gathered on rank 0 when the model is saved. The bucket sizes are what
    transformers' "auto" would derive from `model.config.hidden_size`, given here because the reward-model
    wrappers have no `config` (parameters under 10 x hidden stay whole on every rank). Needs
    `pip install -e ".[deepspeed]"`."""
    return {
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": "auto"},
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
    }


def training_arguments(
    settings: dict, out_dir: Path, n_train: int, world_size: int, device: str, seed: int, hidden_size: int | None = None
) -> TrainingArguments:
    """The paper's recipe: bf16, cosine with 3 % warm-up, gradient accumulation to the global batch; ZeRO-3 when
    config key finetune.zero3 is on (`hidden_size` sizes its buckets)."""
    per_device = min(settings["per_device_batch_size"], settings["global_batch_size"])
    accumulation = max(1, settings["global_batch_size"] // (per_device * world_size))
    bf16 = models.resolve_dtype(settings["dtype"], device) == torch.bfloat16
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=settings["epochs"],
        learning_rate=settings["lr"],
        weight_decay=settings["weight_decay"],
        lr_scheduler_type="cosine",
        warmup_steps=settings["warmup_ratio"],
        bf16=bf16,
        use_cpu=device == "cpu",
        activation_checkpointing=settings["gradient_checkpointing"],
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=max(1, math.ceil(n_train / (per_device * accumulation * world_size) / 20)),
        remove_unused_columns=False,
        report_to=[],
        seed=seed,
        disable_tqdm=False,
        dataloader_num_workers=0,
        deepspeed=zero3_config(hidden_size) if settings.get("zero3") else None,
    )


def finetune_reward_model(
    spec: dict,
    settings: dict,
    model_dir: str | Path,
    model_spec: dict,
    train: pd.DataFrame,
    val: pd.DataFrame,
    out_dir: str | Path,
    sae=None,
    device: str = "auto",
    seed: int = 0,
    available_mb: int | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> tuple[Path, pd.DataFrame]:
    """Train one reward model of `spec` (an end-to-end kind of `sarm.variants`, or its `as_dict()`) and save it as a
    reward-model folder that `sarm.reward_model.load` reads. A job killed mid-run resumes from the Trainer's last epoch checkpoint
    (kept in `<out_dir>.checkpoints`). Under torchrun every process runs this; rank 0 writes the folder.
    Returns the folder and the training log."""
    out_dir = Path(out_dir)
    spec = spec if isinstance(spec, RewardModelSpec) else spec_from_dict(out_dir.name, spec)
    device = models.resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun, before any process group
    zero3 = bool(settings.get("zero3")) and world_size > 1
    if settings.get("zero3") and not zero3:
        log.info("finetune.zero3 with one process: nothing to shard over, trained without DeepSpeed")
    settings = {**settings, "zero3": zero3}
    train, dropped = _whole_batches(train, min(settings["per_device_batch_size"], settings["global_batch_size"]), world_size)
    tokenizer = models.load_tokenizer(model_dir, model_spec.get("chat_template"), model_spec.get("trust_remote_code", False))
    train_set = PairDataset(tokenizer, train, model_spec["max_length"])
    val_set = PairDataset(tokenizer, val, model_spec["max_length"])
    torch.manual_seed(seed)
    model = with_length_debias(spec.build_trainable(model_dir, model_spec, sae, tokenizer), spec, train_set)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = _backbone_config(model)
    estimate = estimate_memory_mb(
        n_params,
        n_trainable,
        2 * settings["per_device_batch_size"],
        model_spec["max_length"],
        config,
        settings["gradient_checkpointing"],
        device != "cpu",
        world_size if zero3 else 1,
    )
    if device != "cpu":
        available_mb = torch.cuda.get_device_properties(torch.device(device)).total_memory // 2**20
        check_fits(estimate, available_mb, "GPU")
    else:  # the job's host memory holds every process
        check_fits(estimate * world_size, available_mb, "host" if world_size == 1 else f"host ({world_size} processes)")
    log.info(
        "%s: %s parameters (%s trained), about %s MB per process at batch %d x %d tokens",
        spec.kind,
        f"{n_params:,}",
        f"{n_trainable:,}",
        f"{estimate:,}",
        settings["per_device_batch_size"],
        model_spec["max_length"],
    )

    checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoints")
    args = training_arguments(settings, checkpoint_dir, len(train_set), world_size, device, seed, config.hidden_size)
    history = _History(on_log)
    trainer = _BTTrainer(
        model=model.to(device),
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=PairCollator(tokenizer.pad_token_id),
        compute_metrics=_pair_accuracy,
        callbacks=[history, _FaultPoint()],
    )
    trainer.head_lr = settings.get("head_lr")
    resume = any(checkpoint_dir.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=resume or None)
    metrics = trainer.evaluate()
    speed = {
        "train_seconds": round(result.metrics["train_runtime"], 1),
        "sequences_per_second": round(2 * len(train_set) * settings["epochs"] / result.metrics["train_runtime"], 3),
        "tokens_per_second": round(train_set.n_tokens * settings["epochs"] / result.metrics["train_runtime"], 1),
        "resumed": resume,
    }
    ranks = _gather_ranks(trainer, train)
    if zero3:  # the weights are sharded: gather them (every rank takes part) into a plain model on rank 0
        state = trainer.accelerator.get_state_dict(trainer.deepspeed)
        if trainer.is_world_process_zero():
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # else from_pretrained would build the model sharded again
            model = with_length_debias(spec.build_trainable(model_dir, model_spec, sae, tokenizer), spec, train_set)
            model.load_state_dict({k: v.float() for k, v in state.items()})
            trainer.model = model
    if trainer.is_world_process_zero():
        parallel = {"world_size": world_size, "backend": ranks["backend"], "pairs_dropped": dropped}
        _save(
            trainer.model,
            spec,
            settings,
            model_dir,
            model_spec,
            tokenizer,
            out_dir,
            seed,
            {
                "val_accuracy": metrics["eval_accuracy"],
                "val_loss": metrics["eval_loss"],
                **speed,
                **parallel,
                "memory_estimate_mb": estimate,
            },
            ranks,
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return out_dir, pd.DataFrame(history.rows)


def with_length_debias(model: nn.Module, spec: RewardModelSpec, train_set: PairDataset) -> nn.Module:
    """`model` with the length term its spec asks for (config key reward_models.<name>.length_debias), scaled to
    the training pairs' response-length differences (tokens); it trains with the model and is not saved with it."""
    differences = [response_tokens(chosen) - response_tokens(rejected) for chosen, rejected in train_set.items]
    debias = length_debias(spec.as_dict(), differences)
    if debias is not None and not isinstance(model, _PairReward):
        raise SarmError(
            f"config key reward_models.{spec.name}.length_debias: mode {spec.kind} trains a "
            f"{type(model).__name__}, which has no length term"
        )
    model.length_debias = debias
    return model


def _whole_batches(train: pd.DataFrame, per_device: int, world_size: int) -> tuple[pd.DataFrame, int]:
    """Several processes: the pairs beyond a multiple of per_device x processes are dropped (the sampler would
    otherwise fill the last batch with repeated pairs, and the processes would not see a batch each)."""
    if world_size == 1:
        return train, 0
    unit = per_device * world_size
    keep = len(train) - len(train) % unit
    if keep == 0:
        raise SarmError(
            f"{len(train)} training pairs are fewer than one batch per process ({per_device} x {world_size}); "
            "lower finetune.per_device_batch_size or the processes (finetune.gpus / finetune.cpu_processes)"
        )
    if keep < len(train):
        log.warning(
            "%d processes x %d pairs a batch: the last %d of %d training pairs are dropped",
            world_size,
            per_device,
            len(train) - keep,
            len(train),
        )
    return train.iloc[:keep], len(train) - keep


def _gather_ranks(trainer: _BTTrainer, train: pd.DataFrame) -> dict:
    """What each process did, gathered on every rank: the ids of the pairs it trained on, in order (a resumed
    run: since the resume), and the parameters it holds (under ZeRO-3, its shard)."""
    ids = train["id"].astype(str).tolist() if "id" in train.columns else [str(i) for i in range(len(train))]
    params = list(trainer.model.parameters())
    mine = {
        "rank": int(os.environ.get("RANK", "0")),
        "pairs": [ids[i] for i in trainer.seen],
        "local_parameters": int(sum(getattr(p, "ds_tensor", p).numel() for p in params)),
        "parameters": int(sum(getattr(p, "ds_numel", p.numel()) for p in params)),
    }
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        backend = torch.distributed.get_backend()
    else:
        everyone, backend = [mine], None
    return {"world_size": len(everyone), "backend": backend, "ranks": sorted(everyone, key=lambda r: r["rank"])}


def _backbone_config(model):
    return model.classifier.config if isinstance(model, ClassifierForReward) else model.backbone.config


RANKS_FILE = "ranks.json"


PAD_TOKEN = "<|sarm_pad|>"  # added to a saved classifier's tokenizer when it has no special token to spare


def _template_ids(tokenizer) -> set[int]:
    """Ids of a few short conversations as `activations.encode` tokenises them: the chat template's own tokens
    (its end-of-turn token among them; typed markup in a content never becomes a special token)."""
    ids = set()
    user, system, assistant = ({"role": role, "content": "x"} for role in ("user", "system", "assistant"))
    for prompt in ([user], [system, user], [user, assistant, user]):
        try:
            ids.update(activations.encode(tokenizer, prompt, "x", 1 << 20).input_ids.tolist())
        except Exception:  # a template that refuses this shape of conversation (a system message, say)
            continue
    return ids


def _export_pad(classifier, tokenizer):
    """A copy of `tokenizer` whose pad token no chat-templated conversation holds, and `classifier`'s config set to
    its id, so that outside loaders score the end-of-turn token. HF's *ForSequenceClassification pools the last
    token whose id is not `pad_token_id` (transformers 5; older versions: the token before the first pad), and a
    pad that is the end-of-turn token (SmolLM2's pad is `<|im_end|>`) would make it read the token before. Takes
    the pad, unk or another special token the template never emits, else adds `PAD_TOKEN`."""
    tokenizer = copy.deepcopy(tokenizer)
    taken = _template_ids(tokenizer) | {tokenizer.eos_token_id, tokenizer.bos_token_id}
    rows = classifier.get_input_embeddings().num_embeddings
    specials = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    for token in (tokenizer.pad_token, tokenizer.unk_token, *specials):
        token_id = None if token is None else tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id < rows and token_id not in taken:
            tokenizer.pad_token = token
            break
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if tokenizer.pad_token_id >= rows:
            classifier.resize_token_embeddings(len(tokenizer))
    classifier.config.pad_token_id = tokenizer.pad_token_id
    classifier.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _save(model, spec, settings, model_dir, model_spec, tokenizer, out_dir: Path, seed: int, results: dict, ranks: dict) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    training = {"mode": spec.kind, **settings, "seed": seed, **results}
    if model.length_debias is not None:
        training.update(model.length_debias.record())
    if isinstance(model, ClassifierForReward):
        saved_tokenizer = _export_pad(model.classifier, tokenizer)
        model.classifier.save_pretrained(tmp)
        saved_tokenizer.save_pretrained(tmp)
        config = {
            "format": CLASSIFIER_FORMAT,
            "version": 1,
            "base_model": base_model_config(model_spec, model_dir, "."),
            "read_at": (
                f"final token of the chat-templated prompt + response, trailing whitespace dropped; the pad "
                f"token {saved_tokenizer.pad_token} (id {saved_tokenizer.pad_token_id}) is in no conversation, "
                "so HF's pad-id lookup finds the same token"
            ),
            "training": training,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    else:
        model.backbone.save_pretrained(tmp / BACKBONE_DIR)
        tokenizer.save_pretrained(tmp / BACKBONE_DIR)
        head = model.head.weight.detach().float().reshape(-1).cpu()
        sae = model.sae
        if sae is not None:
            set_topk(sae, True)  # saved as trained; the config's `topk` switches it at load time
        config = model_config(
            spec.as_dict(),
            model_spec,
            model_dir,
            model.backbone.config.hidden_size,
            training,
            base_path=BACKBONE_DIR,
        )
        RewardModel(config, head, sae).save_pretrained(tmp)
    (tmp / RANKS_FILE).write_text(json.dumps(ranks, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


# --- one job in several processes: the rule's script launches this module under torchrun ---


def processes(settings: dict, device: str) -> int:
    """Data-parallel processes of one job on `device` (resolved): finetune.gpus on GPUs, finetune.cpu_processes
    on the CPU."""
    return settings["gpus"] if device.startswith("cuda") else settings.get("cpu_processes", 1)


def write_job(path: str | Path, **arguments) -> Path:
    """The arguments of `finetune_reward_model` as JSON (pair tables by path), for `python -m sarm.finetune`;
    `tracking` = the arguments of `sarm.tracking.wandb_run` (rank 0 logs to wandb)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(arguments, indent=2, default=str))
    return path


def run_job(path: str | Path) -> None:
    """Run one fine-tuning job from its JSON: in the rule's own process, or in each process torchrun starts."""
    from contextlib import nullcontext

    from sarm.data import read_pairs
    from sarm.sae import load_sae
    from sarm.tracking import wandb_run

    job = json.loads(Path(path).read_text())
    train = read_pairs(job.pop("train"))
    if job["settings"]["max_pairs"]:
        train = train.head(job["settings"]["max_pairs"])
    val = read_pairs(job.pop("val"))
    sae = load_sae(job.pop("sae")) if job.get("sae") else job.pop("sae", None)
    device = models.resolve_device(job.pop("device"))
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process
    tracking = job.get("tracking")
    with wandb_run(**tracking) if tracking else nullcontext() as run:  # rank 0's run, None elsewhere
        out, history = finetune_reward_model(
            job["spec"],
            job["settings"],
            job["model_dir"],
            job["model_spec"],
            train,
            val,
            job["out_dir"],
            sae,
            device,
            job["seed"],
            job.get("available_mb"),
            on_log=run.log if run is not None else None,
        )
    if int(os.environ.get("RANK", "0")) == 0:
        history.to_csv(out / "history.csv", index=False)


_PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to the calling process when its parent ends (Linux prctl PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent ends (Linux; elsewhere nothing): the rule's
    script ends with Snakemake even when Snakemake is SIGKILLed, and a torchrun worker with its launcher. A
    parent that ended before the call is caught by the re-parenting check."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    _set_pdeathsig(sig)
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)


def run_processes(command: list[str], log_path: str | Path, env: dict | None = None, grace_s: float = 30.0) -> None:
    """Run the launcher (torchrun) in its own process group, its output appended to `log_path`. If this process
    is told to stop (SIGTERM/SIGINT/SIGHUP, e.g. from `die_with_parent`), the group is stopped first (SIGTERM,
    which torchrun passes on to its workers, then SIGKILL after `grace_s`); the launcher itself ends with this
    process (PDEATHSIG). A launcher that fails (a process died: torchrun then stops the others) raises a
    SarmError."""
    preexec = _set_pdeathsig if sys.platform.startswith("linux") else None
    with open(log_path, "a") as log_file:
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=preexec
        )
    stopped: list[tuple[int, float]] = []

    def stop(signum, frame):  # no waiting here: the loop below waits
        stopped.append((signum, time.monotonic()))
        _signal_group(proc, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopped and time.monotonic() > stopped[0][1] + grace_s:
                    _signal_group(proc, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _signal_group(proc, signal.SIGKILL)  # anything left in the launcher's group
    if stopped:
        raise SarmError(f"stopped by {signal.Signals(stopped[0][0]).name}; the training processes were ended")
    if code != 0:
        raise SarmError(f"the training processes failed (exit status {code}); see {log_path}")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker (its own session): end with the launcher
        die_with_parent(signal.SIGKILL)
    # The job runs in the package's module, not in this `__main__` copy of it: the variants build the package's
    # classes (`sarm.finetune.SarmForReward`), which this copy's isinstance checks would not recognise.
    from sarm import finetune

    finetune.run_job(sys.argv[1])
