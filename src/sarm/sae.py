"""The sequence-level TopK SAE: trained with sae-lens' own trainer on cached sentence-final activations,
or loaded pretrained; saved and loaded in sae-lens format; measured on held-out activations."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sarm import checkpoints
from sarm.errors import SarmError
from sarm.sae_input import check_cache

log = logging.getLogger(__name__)


def default_width(d_in: int, multiplier: int = 16) -> int:
    return multiplier * d_in


def default_k(d_in: int) -> int:
    """The paper's k = 3/64 x hidden (192 for a 4096-wide model)."""
    return max(1, round(3 * d_in / 64))


def check_shape(d_sae: int, k: int) -> None:
    if not 0 < k < d_sae:
        raise SarmError(f"config key sae.k = {k} must be between 1 and the SAE width - 1 (width = {d_sae})")


Chunk = torch.Tensor | Callable[[], torch.Tensor]  # [n, d_in] vectors, or a loader of them


def cache_chunks(cache, field: str = "sent", what: str = "vectors") -> list[Callable[[], torch.Tensor]]:
    """One loader per shard of an ActivationCache: its sentence-final (`field="sent"`) or final-token
    (`"final"`) vectors in float32, or (`what="sequences"`) the number of the sequence each vector comes from,
    as a [n, 1] column in the same order (to measure the stream)."""
    ids = {"sent": "sent_seq", "final": "seq"}[field]

    def loader(shard):
        def load() -> torch.Tensor:
            tensors = cache.load_shard(shard)
            if field not in tensors:  # a shard without sentence ends
                return torch.zeros(0, 1 if what == "sequences" else cache.hidden_size)
            return tensors[ids][:, None].float() if what == "sequences" else tensors[field].float()

        return load

    return [loader(shard) for shard in cache.shards]


def _load(chunk: Chunk) -> torch.Tensor:
    return chunk() if callable(chunk) else chunk


def shuffled_batches(chunks: Sequence[Chunk], batch_size: int, buffer_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches that approximate an i.i.d. stream over the corpus, holding at most `buffer_size` (+ one
    chunk) vectors in memory: the data provider sae-lens' trainer pulls from. Each epoch reads the chunks (a
    cache's shards, length-sorted as they were cached, and the final-token shards) in a new random order into a
    pool, which is shuffled and drained into batches whenever it holds `buffer_size` vectors; the remainder of
    a pool opens the next one."""
    generator = torch.Generator().manual_seed(seed)
    pool: list[torch.Tensor] = []
    while True:
        n_seen, pooled = 0, sum(len(p) for p in pool)  # the last pool's remainder
        for i in torch.randperm(len(chunks), generator=generator).tolist():
            vectors = _load(chunks[i])
            pool.append(vectors)
            n_seen += len(vectors)
            pooled += len(vectors)
            if pooled >= buffer_size:
                yield from _drain(pool, batch_size, generator)
                pooled = sum(len(p) for p in pool)
        if n_seen == 0:
            raise SarmError("the SAE corpus is empty: no sentence-final activations were cached")
        if pool:
            yield from _drain(pool, batch_size, generator)


def _drain(buffer: list[torch.Tensor], batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    pool = torch.cat(buffer)
    buffer.clear()
    pool = pool[torch.randperm(len(pool), generator=generator)]
    n_full = len(pool) // batch_size * batch_size
    for start in range(0, n_full, batch_size):
        yield pool[start : start + batch_size]
    if n_full < len(pool):
        buffer.append(pool[n_full:])  # the remainder opens the next pool


def train_sae(
    chunks: Sequence[Chunk],
    d_in: int,
    d_sae: int,
    k: int,
    total_samples: int,
    batch_size: int = 1024,
    lr: float = 5e-4,
    device: str = "cpu",
    seed: int = 0,
    buffer_size: int = 65536,
    log_to_wandb: bool = False,
    metadata: dict | None = None,
    checkpoint_root: str | Path | None = None,
    n_checkpoints: int = 0,
) -> TopKTrainingSAE:
    """Train a TopK SAE (Gao et al. 2024) with sae-lens' SAETrainer on a corpus given as chunks ([n, d_in]
    float tensors or loaders of them, e.g. `cache_chunks`), streamed in a new random order each epoch.

    With `checkpoint_root`, `n_checkpoints` evenly spaced checkpoints are kept there, and a run that finds
    one resumes from it: weights, optimiser, dead-latent counters and the data stream's position, so it
    ends exactly where an uninterrupted run would."""
    torch.manual_seed(seed)
    cfg = topk_config(d_in, d_sae, k, device, metadata)
    resume_from = checkpoints.latest(checkpoint_root)
    if resume_from is not None:
        sae = TopKTrainingSAE.load_from_disk(resume_from, device=device)
    else:
        sae = TopKTrainingSAE(cfg)
        # b_pre starts at the corpus mean: standardised states share a large common direction (70 % of the
        # squared norm for SmolLM2 at L=15), and a zero start spends the first steps learning it.
        sae.b_dec.data = corpus_mean(chunks, buffer_size, seed).to(sae.b_dec)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_samples,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=device,
        dead_feature_window=max(1, min(1000, total_samples // batch_size // 4)),
        feature_sampling_window=max(1, min(2000, total_samples // batch_size)),
        logger=LoggingConfig(log_to_wandb=log_to_wandb, log_weights_to_wandb=False),
        checkpoint_path=str(checkpoint_root) if checkpoint_root else None,
        n_checkpoints=n_checkpoints if checkpoint_root else 0,
    )
    trainer = SAETrainer(
        cfg=trainer_cfg,
        sae=sae,
        data_provider=iter(()),
        save_checkpoint_fn=lambda checkpoint_path: checkpoint_path and checkpoints.mark_complete(checkpoint_path),
    )
    steps_done = 0
    if resume_from is not None:
        trainer.load_trainer_state(resume_from)
        # sae-lens saves before it counts the step just taken
        steps_done = trainer.n_training_steps = trainer.n_training_steps + 1
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
        log.info("resuming SAE training from %s (%d samples, %d steps done)", resume_from, trainer.n_training_samples, steps_done)
    trainer.data_provider = _stream(chunks, batch_size, buffer_size, seed, steps_done)
    return trainer.fit()


def topk_config(d_in: int, d_sae: int, k: int, device: str = "cpu", metadata: dict | None = None) -> TopKTrainingSAEConfig:
    check_shape(d_sae, k)
    cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        device=device,
        apply_b_dec_to_input=True,  # x - b_pre before encoding, as in the paper
        normalize_activations="none",  # inputs are standardised per token already
        # The paper keeps decoder columns at unit norm. sae-lens (>= 6.14) trains with the latents scaled by the
        # decoder norms and folds the norms into the encoder when it saves: the saved decoder rows have norm 1
        # and the saved SAE computes what the trained one did.
        rescale_acts_by_decoder_norm=True,
    )
    for key, value in (metadata or {}).items():
        setattr(cfg.metadata, key, value)
    return cfg


def random_sae(d_in: int, d_sae: int, k: int, seed: int = 0, metadata: dict | None = None) -> TopKTrainingSAE:
    """The ablation's SAE with a random-init encoder: sae-lens' own initialisation, never trained."""
    torch.manual_seed(seed)
    return TopKTrainingSAE(topk_config(d_in, d_sae, k, "cpu", metadata))


def _stream(chunks, batch_size: int, buffer_size: int, seed: int, skip: int) -> Iterator[torch.Tensor]:
    """The seeded batch stream from batch `skip` on, with the fault-injection point at every batch."""
    for step, batch in enumerate(shuffled_batches(chunks, batch_size, buffer_size, seed)):
        if step >= skip:
            checkpoints.fault_point("sae", step)
            yield batch


def corpus_mean(chunks: Sequence[Chunk], max_vectors: int, seed: int = 0) -> torch.Tensor:
    """The mean of the whole corpus, or of a random sample of its chunks holding about `max_vectors` vectors."""
    generator = torch.Generator().manual_seed(seed + 1)  # not the stream's own order
    total, count = None, 0
    for i in torch.randperm(len(chunks), generator=generator).tolist():
        vectors = _load(chunks[i])
        total = vectors.sum(0) if total is None else total + vectors.sum(0)
        count += len(vectors)
        if count >= max_vectors:
            break
    if not count:
        raise SarmError("the SAE corpus is empty: no sentence-final activations were cached")
    return total / count


def save_sae(sae, out_dir: str | Path) -> Path:
    """Save in sae-lens' inference format (cfg.json + sae_weights.safetensors)."""
    out_dir = Path(out_dir)
    if hasattr(sae, "save_inference_model"):
        sae.save_inference_model(out_dir)
    else:
        sae.save_model(out_dir)
    return out_dir


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    path = Path(path)
    if not (path / "cfg.json").exists():
        raise SarmError(f"{path} is not an sae-lens folder (no cfg.json)")
    try:
        return SAE.load_from_disk(path, device=device).eval().requires_grad_(False)
    except Exception as err:
        raise SarmError(f"SAE at {path} could not be loaded: {type(err).__name__}: {str(err).splitlines()[0]}") from err


def load_pretrained(spec: dict, device: str = "cpu") -> SAE:
    """`{release, sae_id}` through sae-lens' registry and the hub, or `{path}` to a local sae-lens folder."""
    if spec.get("path"):
        return load_sae(spec["path"], device)
    try:
        return SAE.from_pretrained(spec["release"], spec["sae_id"], device=device).eval().requires_grad_(False)
    except Exception as err:
        raise SarmError(
            f"config key sae.pretrained: SAE {spec['release']}/{spec['sae_id']} could not be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
        ) from err


@torch.no_grad()
def evaluate_sae(sae, vectors: torch.Tensor, batch_size: int = 4096) -> dict:
    """FVU (1 - explained variance), mean L0 and the fraction of latents that never fire on `vectors`."""
    if len(vectors) == 0:
        raise SarmError("no held-out activations to measure the SAE on")
    sq_err, fired = 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    l0 = 0.0
    dtype = next(sae.parameters()).dtype
    device = next(sae.parameters()).device
    for start in range(0, len(vectors), batch_size):
        x = vectors[start : start + batch_size].to(device, dtype)
        z = sae.encode(x)
        sq_err += (sae.decode(z) - x).float().pow(2).sum().item()
        active = z != 0
        l0 += active.sum().item()
        fired |= active.any(0).cpu()
    total_var = (vectors.float() - vectors.float().mean(0)).pow(2).sum().item()
    return {
        "fvu": sq_err / total_var,
        "l0": l0 / len(vectors),
        "dead_fraction": 1.0 - fired.float().mean().item(),
        "n_vectors": len(vectors),
    }


def warn_if_useless(metrics: dict, name: str) -> None:
    if metrics["fvu"] >= 1.0:
        log.warning(
            "the SAE explains no variance on held-out %s states (FVU = %.3f >= 1): train it on more vectors or longer",
            name,
            metrics["fvu"],
        )


def prepare_sae(
    settings: dict,
    train,
    device: str,
    seed: int,
    metadata: dict,
    log_to_wandb: bool = False,
    checkpoint_root=None,
    kind: str = "sequence",
    pairs=None,
):
    """The SAE stage: train on `train`'s corpus (an ActivationCache: sentence-final states for the sequence-level
    SAE, sampled token states for the token-level one), resuming from `checkpoint_root` when a run was cut
    short; or load the pretrained one named in `settings`; or (kind `random`) initialise one and not train it.
    `pairs`: the training pairs' cache whose final-token states join a plain-text corpus (include_final_token)."""
    d_in = train.hidden_size
    start = time.perf_counter()
    if kind == "random":
        width, k = settings["width"] or default_width(d_in), settings["k"] or default_k(d_in)
        sae, source = random_sae(d_in, width, k, seed, metadata), {"random_init": {"seed": seed}}
    elif settings["pretrained"] and kind == "sequence":
        sae = load_pretrained(settings["pretrained"], device)
        # its hook, width and normalisation against what the cache holds
        source = {"pretrained": settings["pretrained"], "input": check_cache(sae, train)}
    else:
        width = settings["width"] or default_width(d_in)
        k = settings["k"] or default_k(d_in)
        corpus = cache_chunks(train, "sent")
        if settings["include_final_token"]:  # where the head reads, mixed into every pool of the stream
            corpus += cache_chunks(pairs or train, "final")

        if checkpoint_root is not None:
            shaping = {key: value for key, value in settings.items() if key != "n_checkpoints"}
            checkpoint_root = checkpoints.open_root(
                checkpoint_root, {"sae": shaping, "seed": seed, "corpus": train.meta, "pairs": (pairs or train).meta}
            )
        sae = train_sae(
            corpus,
            d_in,
            width,
            k,
            settings["training_samples"],
            settings["batch_size"],
            settings["lr"],
            device,
            seed,
            log_to_wandb=log_to_wandb,
            metadata=metadata,
            checkpoint_root=checkpoint_root,
            n_checkpoints=settings["n_checkpoints"],
        )
        source = {"trained": {key: settings[key] for key in ("training_samples", "batch_size", "lr", "include_final_token")}}
        source["trained"]["corpus"] = {"sequence": "sentence-final states", "token": "sampled token states"}[kind]
        source["trained"]["corpus"] += (
            " of a plain-text corpus" if train.meta.get("source") == "text" else " of the training pairs"
        )
    seconds = time.perf_counter() - start
    return sae, source, seconds


def measure(sae, val) -> dict:
    """Held-out metrics through a (saved and re-loaded) SAE: on sentence-final and final-token states."""
    metrics = {
        "heldout_sentence": evaluate_sae(sae, torch.cat(list(val.sentence_shards()))),
        "heldout_final_token": evaluate_sae(sae, val.final()),
    }
    for name, values in metrics.items():
        warn_if_useless(values, name)
    return metrics
