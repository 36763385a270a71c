"""Cluster sizing and launching: what each heavy job asks the scheduler for, computed from the experiment.

`estimate(rule, config, ...)` returns the host memory (`mem_mb`), wall time (`runtime`, minutes), GPU count
(`gpu`) and an informative GPU-memory figure (`gpu_mem_mb`) of one job. The inputs are

- the model's size: the parameter count of the layers actually loaded (embeddings + decoder layers 1..L;
  later layers are never built), from the model's `config.json` when the model folder exists, else from
  config key `cluster.model_shape` (`params_b`, `num_hidden_layers`, `hidden_size`; loaded share =
  params × L / layers), else a conservative 8B fallback (`FALLBACK_SHAPE`) with a warning;
- the batch size, max length and dtype (bytes per weight: 2 for bf16/fp16, or `auto` on CUDA; else 4);
- the data size: pairs per table, from the table if it was built already, else from the local data file's
  rows, config key `cluster.dataset_pairs` (hub data before its fetch), the `max_pairs` caps, or
  `UNKNOWN_PAIRS`;
- `attempt`: a retried job (SLURM killed it for time or memory) asks for `attempt` × the first request.

Runtimes assume `GPU_TFLOPS` effective on a GPU and `CPU_TFLOPS_PER_THREAD` per CPU thread (about a quarter
of what the embedded default measured on 2 cores), doubled, plus `SETUP_MINUTES`: planning figures that
err long, since a job killed at its limit costs a retry. Only the numbers a scheduler acts on are rounded.

Multi-GPU: `launch_command` builds the command that runs a Python module on N GPUs of one node.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GPU_TFLOPS = 100.0  # effective bf16 throughput assumed on one GPU (A100 peak 312, H100 989)
CPU_TFLOPS_PER_THREAD = 0.05  # the default caching stage measured ~0.2 per core (SmolLM2, 2 cores)
SETUP_MINUTES = 10  # imports, loading weights, reading caches
BASE_MB = 3000  # python + torch + transformers + sae-lens, measured ~1 GB RSS, with head-room
UNKNOWN_PAIRS = 100_000  # hub data before its fetch (Skywork-80K is ~77k pairs)
SENTENCES_PER_SEQUENCE = 20  # sentence-final vectors per cached sequence (HH-RLHF: 15 on average)
AVG_TOKENS_CAP = 1024  # planned tokens per sequence: min(max_length, this) (HH-RLHF at 384: 194 measured)
GPU_RULES = {"cache_activations", "cache_bon", "sae", "finetune_reward", "rl_train", "rl_evaluate"}
RL_OVERHEAD_MB = 3000  # TRL, peft and generation buffers beyond BASE_MB
BON_CANDIDATES = 16  # planned candidates per best-of-N prompt before the file is read (AlpacaEval BoN: 16)  # rules that use a GPU when device is not cpu


@dataclass(frozen=True)
class Shape:
    params_b: float  # the whole model, in billions
    num_hidden_layers: int
    hidden_size: int
    loaded_b: float  # embeddings + layers 1..L, in billions
    source: str
    num_attention_heads: int = 0  # 0: unknown (hidden_size / 128 is assumed)

    @property
    def heads(self) -> int:
        return self.num_attention_heads or max(1, self.hidden_size // 128)


FALLBACK_SHAPE = {"params_b": 8.0, "num_hidden_layers": 32, "hidden_size": 4096}


def model_shape(config: dict, folders: list[str | Path] = ()) -> Shape:
    """The model's size: its config.json (in model.path or one of `folders`), else config key
    cluster.model_shape, else FALLBACK_SHAPE."""
    layer = config["model"]["layer"]
    for folder in [config["model"].get("path"), *folders]:
        if folder and (Path(folder) / "config.json").exists():
            return _shape_from_config(Path(folder) / "config.json", layer)
    given = config.get("cluster", {}).get("model_shape")
    source = "config key cluster.model_shape"
    if given is None:
        given, source = FALLBACK_SHAPE, "fallback (no config.json yet and no config key cluster.model_shape)"
        log.warning("sizing jobs for an 8B model: give config key cluster.model_shape to size them for yours")
    share = min(layer, given["num_hidden_layers"]) / given["num_hidden_layers"]
    return Shape(given["params_b"], given["num_hidden_layers"], given["hidden_size"], given["params_b"] * share, source)


@functools.lru_cache(maxsize=16)
def _shape_from_config(path: Path, layer: int) -> Shape:
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg.get("num_attention_heads", max(1, h // 128))
    head_dim = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    ffn = cfg.get("intermediate_size") or 4 * h
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * ffn
    embed = cfg.get("vocab_size", 32000) * h
    total = embed * (1 if cfg.get("tie_word_embeddings") else 2) + n * per_layer
    return Shape(total / 1e9, n, h, (embed + min(layer, n) * per_layer) / 1e9, f"{path}", heads)


@functools.lru_cache(maxsize=64)
def count_rows(path: str) -> int | None:
    """Rows of a local parquet / jsonl / json file (gzipped or not); None when it cannot be read cheaply."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(p).metadata.num_rows
        opener = gzip.open if p.suffix == ".gz" else open
        name = p.name.removesuffix(".gz")
        with opener(p, "rt", encoding="utf-8") as f:
            if name.endswith(".jsonl"):
                return sum(1 for line in f if line.strip())
            if name.endswith(".json"):
                data = json.load(f)
                return len(data) if isinstance(data, list) else None
    except (OSError, ValueError):
        return None
    return None


def dataset_pairs(config: dict, name: str) -> int:
    spec = config["datasets"][name]
    rows = count_rows(f"{config['resources_dir']}/data/{name}.parquet")
    if rows is None and spec.get("path"):
        rows = count_rows(spec["path"])
    if rows is None:
        rows = config.get("cluster", {}).get("dataset_pairs", {}).get(name)
    if spec.get("max_pairs"):
        rows = min(rows or spec["max_pairs"], spec["max_pairs"])
    return rows or UNKNOWN_PAIRS


def table_pairs(config: dict, table: str) -> int:
    """Pairs in a cached table: `train`, `val` or an evaluation set (built table first, then estimates)."""
    built = count_rows(f"{config['resources_dir']}/tables/{table}.parquet")
    if built is not None:
        return built
    if table in ("train", "val"):
        total = sum(dataset_pairs(config, name) for name in config["train"]["datasets"])
        if config["train"].get("max_pairs"):
            total = min(total, config["train"]["max_pairs"])
        val = max(1, round(total * config["train"]["val_fraction"]))
        return val if table == "val" else total - val
    if table == "bon":  # candidates, two to a "pair" (sequences = 2 x pairs)
        built = count_rows(f"{config['resources_dir']}/bon/candidates.parquet")
        if built is None:
            prompts = config["bon"]["max_prompts"] or (count_rows(config["bon"]["path"]) if config["bon"]["path"] else None) or 1000
            built = prompts * BON_CANDIDATES
        return max(1, built // 2)
    return dataset_pairs(config, table)


def weight_bytes(model: dict, device: str) -> int:
    if model["dtype"] in ("bfloat16", "float16"):
        return 2
    if model["dtype"] == "auto" and device.startswith("cuda"):
        return 2
    return 4  # float32, or auto where the job may land on a CPU


def training_memory_mb(n_params: int, n_trainable: int, sequences: int, length: int, hidden_size: int, n_layers: int,
                       n_heads: int, checkpointing: bool, on_gpu: bool, shards: int = 1) -> int:
    """Peak memory of a fine-tuning step on one device: fp32 weights and their bf16 autocast copies (6 B a
    parameter), fp32 gradients and AdamW moments of the trained ones (12 B), activations of `sequences` x `length`
    tokens (per layer ~34 bytes x tokens x hidden plus 5 bytes x heads x length^2 x sequences for attention,
    Korthikanti et al. 2022; with checkpointing only each layer's bf16 input and one layer's working set), and
    the process itself (CUDA context or Python + torch + transformers), x 1.2. `shards`: GPUs that ZeRO-3
    splits weights and states over. For SmolLM2 layers 1..15 at 4 pairs x 384 tokens this gives 5.4 GB; the
    job peaked at 5.4 GB RSS on 2 CPU cores (full depth: 8.5 GB estimated, 7.8 GB measured)."""
    tokens = sequences * length
    layer = 34 * tokens * hidden_size + 5 * n_heads * length**2 * sequences
    acts = n_layers * 2 * tokens * hidden_size + layer if checkpointing else n_layers * layer
    base = 500 * 2**20 if on_gpu else 1500 * 2**20
    return int(((6 * n_params + 12 * n_trainable) / shards + acts + base) / 2**20 * 1.2)


def uses_gpu(rule: str, config: dict, rm: str | None = None) -> bool:
    """Whether a job of `rule` runs on a GPU; evaluation does when it scores a tuned model from its text."""
    if rule == "evaluate" and rm is not None and _mode(config, rm) != "frozen":
        return config["device"] != "cpu"
    return rule in GPU_RULES and config["device"] != "cpu"


def _spec(config: dict, rm: str | None) -> dict:
    from sarm.config import REWARD_MODEL_DEFAULTS

    return {**REWARD_MODEL_DEFAULTS, **config.get("reward_models", {}).get(rm or "sarm", {})}


def _mode(config: dict, rm: str | None) -> str:
    return _spec(config, rm)["mode"]


def _mb(n_bytes: float) -> float:
    return n_bytes / 2**20


def _round_up(mb: float, step: int = 1000) -> int:
    return int(math.ceil(mb / step) * step)


def _minutes(flops: float, gpu: bool, threads: int) -> float:
    rate = GPU_TFLOPS if gpu else CPU_TFLOPS_PER_THREAD * max(1, threads)
    return flops / (rate * 1e12) / 60


def sae_shape(config: dict, hidden: int) -> tuple[int, int]:
    width = config["sae"]["width"] or 16 * hidden
    k = config["sae"]["k"] or max(1, round(3 * hidden / 64))
    return width, k


def estimate(rule: str, config: dict, shape: Shape, table: str | None = None, rm: str | None = None,
             attempt: int = 1, threads: int = 8) -> dict:
    """Resources of one job of `rule` (see the module docstring); `table` / `rm` are its wildcards."""
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
    elif rule == "train_reward":
        features = width if _spec(config, rm)["features"] == "sae" else h
        sequences = 2 * (table_pairs(config, "train") + table_pairs(config, "val"))
        host = BASE_MB + _mb(sequences * (features + h) * 4 * 1.5)  # dense feature matrix + hidden states
        gpu_mem = 0
        flops = config["reward"]["epochs"] * sequences * features * 6 + (sequences * h * width * 2 if features == width else 0)
    elif rule == "finetune_reward" or (rule == "evaluate" and _mode(config, rm) != "frozen"):
        spec = _spec(config, rm)
        params_b = shape.params_b if spec["mode"] == "full_depth" else shape.loaded_b
        sae_params = 2 * h * width if spec["features"] == "sae" and spec["mode"] != "full_depth" else 0
        n = params_b * 1e9 + sae_params
        if rule == "finetune_reward":
            pairs = min(table_pairs(config, "train"), config["finetune"]["max_pairs"] or UNKNOWN_PAIRS)
            tokens = 2 * pairs * min(model["max_length"], AVG_TOKENS_CAP) * config["finetune"]["epochs"]
            flops = 8 * n * tokens  # forward + backward (6) + the forward gradient checkpointing repeats (2)
            trained = n if spec["mode"] != "finetune" else n - sae_params
            gpus = config["finetune"]["gpus"] if gpu else 1
            layers = shape.num_hidden_layers if spec["mode"] == "full_depth" else min(model["layer"], shape.num_hidden_layers)
            step_mb = training_memory_mb(  # what sarm.finetune checks before training, on one device
                int(n), int(trained), 2 * config["finetune"]["per_device_batch_size"], model["max_length"], h, layers,
                shape.heads, config["finetune"]["gradient_checkpointing"], gpu,
                gpus if config["finetune"].get("zero3") else 1,
            )
            host = BASE_MB + _mb(n * 4 * 1.25) if gpu else step_mb * 1.1
            gpu_mem = step_mb if gpu else 0
            flops /= gpus
        else:
            sequences = 2 * table_pairs(config, table or "val")
            flops = 2 * n * sequences * min(model["max_length"], AVG_TOKENS_CAP)
            host = BASE_MB + _mb(n * 4 * 1.25)
            gpu_mem = _mb(n * 2 + model["batch_size"] * model["max_length"] * h * 4 * 24) if gpu else 0
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
            flops = rl["steps"] * (2 * policy * completions * rl["max_completion_length"] * 4 + 6 * policy * tokens + 2 * reward / 2 * tokens)
            device_mem = policy * (4 if full else 2) + states + reference + reward
        else:
            prompts = rl["heldout"] * 2  # before and after
            flops = 2 * policy * prompts * rl["max_completion_length"] * 4 + 2 * reward / 2 * prompts * rl["max_completion_length"] * len(config.get("reward_models") or [1, 1])
            device_mem = policy * 2 + reward
        act = completions * (rl["max_completion_length"] + 512) * h * 4 * shape.num_hidden_layers
        # + TRL/peft and generation buffers: the default's rl_train peaked at 5.8 GB on the CPU
        host = BASE_MB + RL_OVERHEAD_MB + _mb(policy * 4 * 1.25 + (0 if gpu else device_mem + act))
        gpu_mem = _mb(device_mem + act) if gpu else 0
    elif rule == "evaluate":
        features = width if _spec(config, rm)["features"] == "sae" else h
        sequences = 2 * table_pairs(config, table or "val")
        host = BASE_MB + _mb(sequences * (features + h) * 4 * 1.5 + (2 * h * width * 4 if features == width else 0))
        gpu_mem = 0
        flops = sequences * h * width * 2 if features == width else 0
    else:
        raise ValueError(f"no resource model for rule {rule!r}")
    runtime = SETUP_MINUTES + 2 * _minutes(flops, gpu, threads)
    n_gpus = (config["finetune"]["gpus"] if rule == "finetune_reward" else 1) if gpu else 0
    return {
        "mem_mb": _round_up(host) * attempt,
        "runtime": int(math.ceil(runtime / 5) * 5) * attempt,
        "gpu": n_gpus,
        "gpu_mem_mb": _round_up(gpu_mem) if gpu else 0,
    }


def launch_command(module: str, args: list[str], gpus: int, mixed_precision: str = "bf16",
                   deepspeed_config: str | None = None, main_process_port: int | None = None) -> str:
    """The command that runs `python -m module args` on `gpus` GPUs of one node.

    One GPU (or none): the module in this Python. Several: `accelerate launch` with one process per GPU
    (data parallel; with `deepspeed_config`, DeepSpeed, e.g. ZeRO-3 as the paper's fine-tuning used).
    The rendezvous port comes from SLURM_JOB_ID when not given, so two jobs on one node do not collide."""
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, not {gpus}")
    if gpus <= 1:
        return shlex.join([sys.executable, "-m", module, *args])
    if main_process_port is None:
        main_process_port = 29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000
    command = [
        "accelerate", "launch", "--num_machines", "1", "--num_processes", str(gpus),
        "--main_process_port", str(main_process_port), "--mixed_precision", mixed_precision,
    ]
    if deepspeed_config:
        command += ["--use_deepspeed", "--deepspeed_config_file", deepspeed_config]
    else:
        command += ["--multi_gpu"]
    return shlex.join([*command, "-m", module, *args])


PLACEHOLDER = "CHANGE-ME"


def check_submission(workflow) -> None:
    """Before the first SLURM submission (Snakemake's `onstart`): stop on a profile placeholder left in, and
    warn when a one-machine GPU limit (profiles/default's `resources: gpu=1`) would serialise GPU jobs."""
    from snakemake.exceptions import WorkflowError
    from snakemake.logging import logger

    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or plugin.name != "slurm":
        return
    jobs = [job for job in workflow.dag.needrun_jobs() if not job.is_local]
    for job in jobs:
        for key in ("slurm_account", "slurm_partition"):
            if str(job.resources.get(key, "")).strip() == PLACEHOLDER:
                raise WorkflowError(
                    f"profiles/slurm/config.yaml: {key} is still the placeholder {PLACEHOLDER!r} (rule {job.rule.name}): "
                    "set it to yours, or delete the line where your cluster needs none"
                )
    limit = workflow.global_resources.get("gpu")
    limit = getattr(limit, "value", limit)
    gpu_jobs = sum(1 for job in jobs if job.resources.get("gpu", 0))
    if isinstance(limit, int) and gpu_jobs > limit:
        logger.warning(
            f"--resources gpu={limit} runs at most {limit} GPU job(s) at a time on the cluster (profiles/default is "
            "applied along with --profile; use --workflow-profile profiles/slurm instead)"
        )
