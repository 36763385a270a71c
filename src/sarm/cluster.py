"""Cluster sizing and launching: the numbers a job's request is computed from (`sarm.workflow.resources` turns them
into each rule's request; `sarm.variants` into a reward model's training and scoring cost). They are

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

Multi-GPU: `launch_command` builds the command that runs a Python module in N processes of one node (one per
GPU, or `finetune.cpu_processes` on a CPU job).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
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
    if table == "corpus":  # the plain-text SAE corpus: windows of sae.corpus.max_length tokens, two to a "pair"
        corpus = config["sae"]["corpus"] or {}
        window = corpus.get("max_length") or config["model"]["max_length"]
        tokens = corpus.get("max_tokens") or (corpus.get("max_documents") or UNKNOWN_PAIRS) * window
        return max(1, math.ceil(tokens / window / 2))
    if table == "bon":  # candidates, two to a "pair" (sequences = 2 x pairs)
        built = count_rows(f"{config['resources_dir']}/bon/candidates.parquet")
        if built is None:
            prompts = (
                config["bon"]["max_prompts"] or (count_rows(config["bon"]["path"]) if config["bon"]["path"] else None) or 1000
            )
            built = prompts * BON_CANDIDATES
        return max(1, built // 2)
    return dataset_pairs(config, table)


def weight_bytes(model: dict, device: str) -> int:
    if model["dtype"] in ("bfloat16", "float16"):
        return 2
    if model["dtype"] == "auto" and device.startswith("cuda"):
        return 2
    return 4  # float32, or auto where the job may land on a CPU


def training_memory_mb(
    n_params: int,
    n_trainable: int,
    sequences: int,
    length: int,
    hidden_size: int,
    n_layers: int,
    n_heads: int,
    checkpointing: bool,
    on_gpu: bool,
    shards: int = 1,
) -> int:
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


def mb(n_bytes: float) -> float:
    return n_bytes / 2**20


def sae_shape(config: dict, hidden: int) -> tuple[int, int]:
    width = config["sae"]["width"] or 16 * hidden
    k = config["sae"]["k"] or max(1, round(3 * hidden / 64))
    return width, k


def launch_command(module: str, args: list[str], processes: int) -> list[str]:
    """The command that runs `python -m module args` in `processes` data-parallel processes of one node.

    One: the module in this Python. Several: torchrun (`python -m torch.distributed.run --standalone`, a free
    rendezvous port of its own, so two jobs on one node do not collide) with one process per GPU, or per CPU
    share when the job runs on the CPU (the module's Trainer then uses gloo). DeepSpeed ZeRO-3 and bf16 come
    from the module's TrainingArguments, not from the launcher."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, not {processes}")
    if processes == 1:
        return [sys.executable, "-m", module, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(processes),
        "-m",
        module,
        *args,
    ]
