"""Training a reward head on cached states: Bradley-Terry, zero-initialised, no bias, on SAE latents (SARM) or the
standardised hidden state (the dense baseline). The trained model is a `sarm.reward_model.RewardModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from sarm import checkpoints
from sarm.errors import SarmError
from sarm.length_debias import LengthDebias, cached_differences, length_debias, planned
from sarm.reward_model import RewardModel, SparseFeatures, model_config
from sarm.variants.spec import DEFAULT_KIND

HEAD_STATE = "head_state.pt"


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def _pairs(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 2i / 2i+1 hold pair i's chosen / rejected sequence (see activations.pair_sequences)."""
    return features[0::2], features[1::2]


def bt_margin_loss(margin: torch.Tensor) -> torch.Tensor:
    """`bt_loss` of pairs whose reward margins r_chosen - r_rejected are given."""
    return -F.logsigmoid(margin).mean()


def bt_val_loss(margin: torch.Tensor) -> torch.Tensor:
    """The BT loss as the history reports it on the validation pairs (softplus(-margin), the same value)."""
    return F.softplus(-margin).mean()


def fit_pairs(
    parameters: list[torch.Tensor],
    score: Callable,
    train,
    val,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
    checkpoint_root: str | Path | None = None,
    loss: Callable[[torch.Tensor], torch.Tensor] = bt_margin_loss,
    val_loss: Callable[[torch.Tensor], torch.Tensor] = bt_val_loss,
    what: str = "reward head training",
    debias: LengthDebias | None = None,
    differences: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], pd.DataFrame]:
    """The pairwise training loop every head on cached states shares: AdamW on `parameters`, the reward of a batch
    of rows `score(rows)`, `loss` of the pairs' margins; rows 2i / 2i+1 of `train` / `val` are pair i's chosen /
    rejected. Leaves `parameters` at the epoch with the highest validation accuracy (the lower `val_loss` breaks
    ties) and returns copies of them, and one history row per epoch. With `checkpoint_root`, every epoch is checkpointed
    there and a run that finds a checkpoint resumes after it, ending exactly as an uninterrupted run would.
    With `debias` (`sarm.length_debias`), the training loss is `debias(margin, differences[batch], loss)`,
    `differences` the training pairs' length differences; its parameters train too and are left at the selected
    epoch's values; validation is the head's alone."""
    chosen, rejected = _pairs(train)
    val_chosen, val_rejected = _pairs(val)
    head = len(parameters)
    if debias is not None:
        if differences is None or len(differences) != len(chosen):
            raise ValueError(f"{what}: a length-debiased loss needs one length difference per training pair")
        parameters = [*parameters, *debias.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    snapshots, history, first = [], [], 1
    resume_from = checkpoints.latest(checkpoint_root)
    if resume_from is not None:
        state = torch.load(resume_from / HEAD_STATE, weights_only=True)
        with torch.no_grad():
            for parameter, saved in zip(parameters, state["parameters"], strict=True):
                parameter.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        snapshots, history, first = list(state["snapshots"]), state["history"], int(resume_from.name) + 1
    for epoch in range(first, epochs + 1):
        checkpoints.fault_point("head", epoch)
        order = torch.randperm(len(chosen), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            margin = score(chosen[idx]) - score(rejected[idx])
            batch_loss = loss(margin) if debias is None else debias(margin, differences[idx], loss)
            if not torch.isfinite(batch_loss):
                raise SarmError(f"{what}: loss is {batch_loss.item()} at epoch {epoch}; lower reward.lr")
            optimizer.zero_grad()
            batch_loss.backward()
            optimizer.step()
            total += batch_loss.item() * len(idx)
        with torch.no_grad():
            margin = score(chosen) - score(rejected)
            val_margin = score(val_chosen) - score(val_rejected)
            row = {
                "epoch": epoch,
                "train_loss": total / len(order),
                "train_accuracy": (margin > 0).float().mean().item(),
                "val_loss": val_loss(val_margin).item(),
                "val_accuracy": (val_margin > 0).float().mean().item(),
            }
        if debias is not None and debias.beta is not None:
            row["length_beta"] = debias.beta.item()
        history.append(row)
        if log:
            log(row)
        snapshots.append([parameter.detach().clone() for parameter in parameters])
        if checkpoint_root is not None:
            _save_state(Path(checkpoint_root) / str(epoch), parameters, optimizer, generator, snapshots, history)
    history = pd.DataFrame(history)
    best = snapshots[selected_epoch(history) - 1]
    with torch.no_grad():
        for parameter, value in zip(parameters, best, strict=True):
            parameter.copy_(value)  # every parameter (the length term's too: its record) as at the selected epoch
    return best[:head], history


def train_head(
    train: torch.Tensor | SparseFeatures,
    val: torch.Tensor | SparseFeatures,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
    checkpoint_root: str | Path | None = None,
    debias: LengthDebias | None = None,
    differences: torch.Tensor | None = None,
) -> tuple[torch.Tensor, pd.DataFrame]:
    """Fit w (zero-initialised, no bias) with BT loss on paired feature rows (`fit_pairs`; `debias`,
    `differences`: its length-debiased loss). Returns the weights and one history row per epoch. Features are
    dense [n, d] tensors or `SparseFeatures` (TopK latents as indices + values: the same result up to float
    rounding, in k / d of the memory)."""
    weight = torch.zeros(train.shape[1], requires_grad=True)
    (best,), history = fit_pairs(
        [weight],
        lambda rows: rows @ weight,
        train,
        val,
        epochs,
        lr,
        batch_size,
        weight_decay,
        seed,
        log,
        checkpoint_root,
        debias=debias,
        differences=differences,
    )
    return best, history


def _save_state(folder: Path, parameters, optimizer, generator, snapshots, history) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "parameters": [parameter.detach() for parameter in parameters],
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "snapshots": snapshots,
        "history": history,
    }
    torch.save(state, folder / HEAD_STATE)
    checkpoints.mark_complete(folder)
    previous = folder.parent / str(int(folder.name) - 1)
    checkpoints.remove(previous)  # one complete checkpoint is enough


def selected_epoch(history: pd.DataFrame) -> int:
    """The epoch `fit_pairs` keeps: best validation accuracy, then lowest validation loss."""
    return int(history.sort_values(["val_accuracy", "val_loss"], ascending=[False, True], kind="stable")["epoch"].iloc[0])


CHECKPOINT_FORMAT = 2  # `fit_pairs` state: a list of parameters (1: one `weight`); another format is discarded


def checkpoint_fingerprint(config: dict, train, val) -> dict:
    """What a head's checkpoints must have been made with to be resumed: its config, its caches, the state format."""
    return {**config, "train": train.meta, "val": val.meta, "checkpoint_format": CHECKPOINT_FORMAT}


def fit_reward_model(
    spec: dict,
    train,
    val,
    model_dir: str | Path,
    model_spec: dict,
    settings: dict,
    sae=None,
    seed: int = 0,
    log=None,
    checkpoint_root: str | Path | None = None,
) -> tuple[RewardModel, pd.DataFrame]:
    """Train a head on cached states (`train`, `val`: ActivationCaches) and wrap it as a RewardModel;
    `spec` is the config's reward-model entry (features, sae, topk, length_debias). With `checkpoint_root`, a run
    cut short resumes from its last epoch."""
    config = cached_model_config(spec, train, model_dir, model_spec, settings, seed)
    features = spec["features"]
    shell = RewardModel(config, torch.zeros(sae.cfg.d_sae if features == "sae" else train.hidden_size), sae)
    if checkpoint_root is not None:
        checkpoint_root = checkpoints.open_root(checkpoint_root, checkpoint_fingerprint(config, train, val))
    differences = cached_differences(train) if spec.get("length_debias") else None
    debias = length_debias(spec, differences)
    weight, history = train_head(
        shell.features(train.final(), sparse=True),
        shell.features(val.final(), sparse=True),
        **optimiser(settings),
        seed=seed,
        log=log,
        checkpoint_root=checkpoint_root,
        debias=debias,
        differences=differences,
    )
    record_selection(config, history, debias)
    return RewardModel(config, weight, sae), history


def optimiser(settings: dict) -> dict:
    """Config key `reward` (epochs, lr, batch_size, weight_decay) as the keywords of `fit_pairs` and `train_head`."""
    return {key: settings[key] for key in ("epochs", "lr", "batch_size")} | {"weight_decay": settings.get("weight_decay", 0.0)}


def cached_model_config(spec: dict, train, model_dir, model_spec: dict, settings: dict, seed: int) -> dict:
    """The `reward_model.json` of a model of `spec` (`as_dict()`) trained on the cached states `train` (an
    ActivationCache, whose dtype and SAE input it records) with `settings` (config key `reward`)."""
    training = {"mode": spec.get("mode", DEFAULT_KIND), "cached": True, **settings, "seed": seed, **planned(spec)}
    return model_config(
        spec,
        {**model_spec, "dtype": train.meta.get("dtype", model_spec["dtype"])},
        model_dir,
        train.hidden_size,
        training,
        sae_input=train.meta.get("sae_input"),
    )


def record_selection(config: dict, history: pd.DataFrame, debias: LengthDebias | None = None) -> None:
    """Put the kept epoch (`selected_epoch`), its validation accuracy and the length term's record in `config`."""
    best = history.loc[selected_epoch(history) - 1]
    config["training"]["selected_epoch"] = int(best["epoch"])
    config["training"]["val_accuracy"] = float(best["val_accuracy"])
    if debias is not None:
        config["training"].update(debias.record())
