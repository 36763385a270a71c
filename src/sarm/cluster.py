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

Multi-GPU: `launch_command` builds the command that runs a Python module in N processes of one node (one per
GPU, or `finetune.cpu_processes` on a CPU job).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import re
import shlex
import subprocess
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
    if table == "corpus":  # the plain-text SAE corpus: windows of sae.corpus.max_length tokens, two to a "pair"
        corpus = config["sae"]["corpus"] or {}
        window = corpus.get("max_length") or config["model"]["max_length"]
        tokens = corpus.get("max_tokens") or (corpus.get("max_documents") or UNKNOWN_PAIRS) * window
        return max(1, math.ceil(tokens / window / 2))
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
            # the processes the job's script launches (sarm.finetune.processes): one per GPU, or cpu_processes
            procs = config["finetune"]["gpus"] if gpu else config["finetune"].get("cpu_processes", 1)
            layers = shape.num_hidden_layers if spec["mode"] == "full_depth" else min(model["layer"], shape.num_hidden_layers)
            step_mb = training_memory_mb(  # what sarm.finetune checks before training, per process
                int(n), int(trained), 2 * config["finetune"]["per_device_batch_size"], model["max_length"], h, layers,
                shape.heads, config["finetune"]["gradient_checkpointing"], gpu,
                procs if config["finetune"].get("zero3") else 1,
            )
            # every process loads the fp32 model on the host before moving it to its GPU (or trains there)
            host = procs * (BASE_MB + _mb(n * 4 * 1.25) if gpu else step_mb * 1.1)
            gpu_mem = step_mb if gpu else 0
            flops /= procs if gpu else 1  # CPU processes share the job's threads
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
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(processes), "-m", module, *args]


PLACEHOLDER = "CHANGE-ME"


def check_submission(workflow) -> None:
    """Before the first SLURM submission (Snakemake's `onstart`): stop on a profile placeholder left in; stop
    when the controller (`sinfo`) or the accounting daemon (`sacct`, which the executor reads job states
    from) does not answer, naming which; stop when a job asks for more GPUs than any node of its partition
    has (it would wait in the queue forever); warn when a one-machine GPU limit (profiles/default's
    `resources: gpu=1`) would serialise GPU jobs."""
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
    nodes = slurm_command(["sinfo", "--noheader", "--Node", "--format=%P|%G"], "the SLURM controller (slurmctld)")
    slurm_command(["sacct", "--noheader", "--allocations", "--starttime=now", "--format=JobID"], "SLURM accounting (slurmdbd)")
    capacity, default = gpus_per_partition(nodes)
    short = {}
    for job in jobs:
        asked = job.resources.get("gpu", 0)
        partition = str(job.resources.get("slurm_partition", "") or default)
        if isinstance(asked, int) and asked > 0 and partition in capacity and asked > capacity[partition]:
            short.setdefault((partition, capacity[partition]), {})[job.rule.name] = asked
    for (partition, has), rules in short.items():
        asks = ", ".join(f"{rule} asks for {n}" for rule, n in sorted(rules.items()))
        raise WorkflowError(
            f"SLURM partition {partition!r} has no node with more than {has} GPU(s) (sinfo -o %G), but {asks}: such "
            "jobs would wait in the queue forever. Run on the CPU (config key device: cpu), or give those rules a GPU "
            "partition (slurm_partition under set-resources in profiles/slurm/config.yaml)"
        )
    limit = workflow.global_resources.get("gpu")
    limit = getattr(limit, "value", limit)
    gpu_jobs = sum(1 for job in jobs if job.resources.get("gpu", 0))
    if isinstance(limit, int) and gpu_jobs > limit:
        logger.warning(
            f"--resources gpu={limit} runs at most {limit} GPU job(s) at a time on the cluster (profiles/default is "
            "applied along with --profile; use --workflow-profile profiles/slurm instead)"
        )


SLURM_TIMEOUT_S = 30  # a SLURM client command slower than this counts as its daemon being down


def slurm_command(command: list[str], daemon: str) -> str:
    """Run a SLURM client command and return its output; when it is missing, fails or hangs, one WorkflowError
    naming the daemon it needs and the command."""
    from snakemake.exceptions import WorkflowError

    shown = shlex.join(command)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except FileNotFoundError:
        raise WorkflowError(f"SLURM: `{command[0]}` is not installed here: run Snakemake where the SLURM commands are (a login node)") from None
    except subprocess.TimeoutExpired:
        raise WorkflowError(f"SLURM: {daemon} did not answer `{shown}` within {SLURM_TIMEOUT_S} s") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise WorkflowError(
            f"SLURM: {daemon} is not reachable: `{shown}` failed ({lines[-1] if lines else f'exit status {result.returncode}'}). "
            "Is the cluster up? (on this machine: tests/slurm/up.sh)"
        )
    return result.stdout


def gpus_per_partition(sinfo_nodes: str) -> tuple[dict[str, int], str | None]:
    """The most GPUs one node of each partition has, and the default partition, from `sinfo -N -o '%P|%G'`
    (gres such as `gpu:4`, `gpu:a100:4(S:0-1)`, `gpu:1,shard:2` or `(null)`)."""

    capacity: dict[str, int] = {}
    default = None
    for line in sinfo_nodes.splitlines():
        if "|" not in line:
            continue
        partition, gres = line.strip().split("|", 1)
        if partition.endswith("*"):
            partition = default = partition[:-1]
        gpus = sum(int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))
        capacity[partition] = max(capacity.get(partition, 0), gpus)
    return capacity, default


def explain_slurm_failures(workflow, log) -> list[str]:
    """After a failed run (Snakemake's `onerror`): one line per failed SLURM job saying why SLURM ended it
    (its time limit, its memory: the plugin itself says only 'FAILED'), from sacct and the job's SLURM log.
    Returns the lines, which are also logged."""

    from snakemake.logging import logger

    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or plugin.name != "slurm":
        return []
    logs = [log] if isinstance(log, (str, Path)) else list(log or [])  # Snakemake 9 passes a list
    text = "".join(Path(f).read_text(errors="replace") for f in logs if Path(f).is_file())
    lines = []
    for block in re.finditer(r"Error in rule (\S+):\n\s+message: SLURM-job '(\d+)' failed(.*?)external_jobid", text, re.S):
        rule, jobid = block.group(1), block.group(2)
        found = re.search(rf"(\S*slurm_logs\S*/{jobid}\.log)", block.group(3))
        slurm_log = found.group(1) if found else None
        why = _failure_reason(jobid, slurm_log)
        where = f"; its SLURM log: {slurm_log}" if slurm_log else ""
        lines.append(f"SLURM job {jobid} (rule {rule}) {why}{where}")
    for line in lines:
        logger.error(line)
    return lines


def _sacct_mb(text: str) -> float | None:

    m = re.match(r"([\d.]+)([KMGT]?)", text or "")
    if not m:
        return None
    return float(m.group(1)) * {"": 1 / 2**20, "K": 1 / 1024, "M": 1, "G": 1024, "T": 2**20}[m.group(2)]


def _failure_reason(jobid: str, slurm_log: str | None) -> str:

    try:
        out = subprocess.run(["sacct", "-j", jobid, "--noheader", "--parsable2", "--format=State,ExitCode,MaxRSS,ReqMem,Elapsed,Timelimit"],
                             capture_output=True, text=True, timeout=SLURM_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 5]
    if not rows:
        return "failed (sacct knows nothing of it)"
    state, exit_code, _, asked, elapsed, limit = rows[0]
    peak = max((_sacct_mb(r[2]) or 0 for r in rows), default=0)
    asked_mb = _sacct_mb(asked.rstrip("nc"))
    log_text = Path(slurm_log).read_text(errors="replace") if slurm_log and Path(slurm_log).is_file() else ""
    states = {r[0].split()[0] for r in rows}
    if "TIMEOUT" in states or "DUE TO TIME LIMIT" in log_text:
        return f"was killed by SLURM at its time limit ({limit}, the rule's runtime) after {elapsed}: ask for more runtime, or let --retries ask for attempt x runtime"
    if "OUT_OF_MEMORY" in states or re.search(r"oom[-_]kill|exceeded (job )?memory limit", log_text, re.I):
        size = f" (peak {peak:.0f} MB of the {asked_mb:.0f} MB asked)" if peak and asked_mb else f" ({asked} asked)"
        return f"was killed by SLURM over its memory{size}: ask for more mem_mb, or let --retries ask for attempt x mem_mb"
    return f"failed with SLURM state {state} (exit code {exit_code}) after {elapsed}: the rule's log says why"

