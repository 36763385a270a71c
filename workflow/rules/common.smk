# Config validation, names and input functions: the logic of the DAG.
import os
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from sarm.config import EXPLAIN_REWARD_MODEL, check, check_references, explain_reward_model
from sarm.errors import SarmError
from sarm.provenance import CACHE_FORMAT, PORTABLE_CPU
from sarm.sae_input import pretrained_input
from sarm.variants import specs_from_config

try:
    check(config, workflow.source_path("../schemas/config.schema.yaml"))  # one line naming the key
    REWARD_MODELS = specs_from_config(config)  # name -> its typed spec (sarm.variants), on the config as given
    validate(config, schema="../schemas/config.schema.yaml")  # fills in the defaults
    check_references(config)  # what the schema cannot say: cross-references between keys
    EXPLAINED = explain_reward_model(config, REWARD_MODELS)  # None: nothing to explain (the default `sarm` absent)
except SarmError as err:
    raise WorkflowError(str(err)) from None

# Every job inherits this process's environment: pinned kernels make the tables the same on every x86-64 CPU.
if config["cpu_kernels"] == "portable":
    for _name, _value in PORTABLE_CPU.items():
        if not os.environ.get(_name):  # a value the shell set wins (and is recorded with every result)
            os.environ[_name] = _value

RESULTS = config["results_dir"]
RESOURCES = config["resources_dir"]
MODEL = config["model"]["name"]
LAYER = config["model"]["layer"]
MODEL_DIR = f"{RESOURCES}/models/{MODEL}"
ACT = f"{RESULTS}/activations/{MODEL}-L{LAYER}"
SAE = f"{MODEL}-L{LAYER}"
REWARD_PARAMS = {name: spec.as_dict() for name, spec in REWARD_MODELS.items()}  # the specs as the rules' params
FROZEN = [name for name, spec in REWARD_MODELS.items() if spec.trains_on_cache]  # heads on cached features
TUNED = [name for name, spec in REWARD_MODELS.items() if not spec.trains_on_cache]  # trained on token ids
# tuned models with a feature head (not full_depth classifiers): their states are cached through their own backbone
TUNED_HEADS = [name for name, spec in REWARD_MODELS.items() if spec.own_backbone and spec.feature_head]
TUNED_ACT = f"{RESULTS}/activations/tuned"  # <rm>/<table>: the states of a tuned model's own layers 1..L
BASELINES = ["length"]
EVAL_TABLES = ["val", *config["eval"]["datasets"]]
USES_GPU = config["device"] != "cpu"


def _sae_input():
    """What the pretrained SAE of config key sae.pretrained reads: its hook's hidden_states index (which must be
    model.layer's) and its normalisation (standardised states for this project's SAEs, raw ones for a public SAE,
    which sae-lens normalises itself). Decided here, before any job runs; None when the workflow trains its SAE."""
    if not config["sae"]["pretrained"]:
        return None
    try:
        states = pretrained_input(config["sae"]["pretrained"], LAYER)
    except SarmError as err:
        raise WorkflowError(str(err)) from None
    for name, spec in REWARD_MODELS.items():
        if not states["standardize"] and spec.own_backbone and spec.reads_sae == "sequence":
            raise WorkflowError(f"config key reward_models.{name}.mode: {spec.kind} standardises the hidden states, but "
                                f"the pretrained SAE (hook {states['hook_name']}) reads raw ones; use mode: frozen")
    return states


SAE_INPUT = _sae_input()


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    dataset=_alternatives(config["datasets"]),
    table=_alternatives(["train", *EVAL_TABLES]),
    rm=_alternatives(REWARD_MODELS),
    sae_kind=_alternatives(["token", "random"]),


def get_final_output():
    return [
        *expand(f"{RESULTS}/tables/accuracy_{{table}}.{{ext}}", table=EVAL_TABLES, ext=["md", "csv"]),
        *expand(f"{RESULTS}/tables/sae_metrics.{{ext}}", ext=["md", "csv"]),
        f"{RESULTS}/figures/accuracy.png",
        f"{RESULTS}/provenance.json",
        *paper_table_outputs(),  # workflow/rules/tables.smk
        *bon_outputs(),
        *length_bias_outputs(),
        *explain_outputs(),
        *ablation_outputs(),
    ]


def activations_of(rm):
    """The cache folder whose states reward model `rm` reads: the base model's (a frozen backbone) or, for a tuned
    model, its own (rules cache_tuned_activations, cache_tuned_bon)."""
    return f"{TUNED_ACT}/{rm}" if REWARD_MODELS[rm].own_backbone else ACT


def tuned_with_sentences(wildcards):
    """A tuned model's caches keep sentence-final states only for train: the feature cards' corpus contexts."""
    return wildcards.table == "train"


# Best-of-N scores every model with a head from cached candidates: frozen ones from one cache of the base model,
# tuned ones from their own (a full_depth classifier has no cached features).
BON_MODELS = [name for name, spec in REWARD_MODELS.items() if spec.feature_head]
BON_CACHE = {name: f"{activations_of(name)}/bon" for name in BON_MODELS}  # the cache each model scores from


def bon_caches():
    """The candidates' caches bon_scores reads, each once."""
    return list(dict.fromkeys(BON_CACHE.values()))


def bon_outputs():
    """Best-of-N tables and curve, when config key bon.path names a best-of-N file."""
    if not config["bon"]["path"] or not BON_MODELS:
        return []
    return [
        *expand(f"{RESULTS}/tables/bon_{{name}}.{{ext}}", name=["winrate", "curve"], ext=["md", "csv"]),
        f"{RESULTS}/figures/bon_curve.png",
    ]


def length_bias_outputs():
    """The length-bias table, when there are eval tables."""
    return expand(f"{RESULTS}/tables/length_bias.{{ext}}", ext=["md", "csv"]) if EVAL_TABLES else []


def length_bias_inputs(wildcards):
    """Every model's eval summaries, and the best-of-N win rates (their picks' mean length) when best-of-N runs."""
    files = {
        "summaries": expand(
            f"{RESULTS}/eval/{{model}}/{{table}}/summary.json", model=[*REWARD_MODELS, *BASELINES], table=EVAL_TABLES
        )
    }
    if bon_outputs():
        files["bon"] = f"{RESULTS}/tables/bon_winrate.csv"
    return files


def bon_file(wildcards):
    if not config["bon"]["path"]:
        raise WorkflowError("config key bon.path: give a best-of-N file to run the best-of-N rules")
    return config["bon"]["path"]


def bon_reference(wildcards):
    """The published best-of-N results (config key bon.reference, a folder), when given."""
    folder = config["bon"]["reference"]
    if not folder:
        return {}
    files = {"results": f"{folder}/bon_eval_results.json"}
    if os.path.exists(f"{folder}/merged_leaderboard.csv"):
        files["leaderboard"] = f"{folder}/merged_leaderboard.csv"
    return files


def dataset_spec(wildcards):
    return config["datasets"][wildcards.dataset]


# --- Local files a rule reads are its inputs, so that editing one re-runs the rule (a hub source has none) ---
def dataset_file(wildcards):
    """fetch_dataset's local file (config key datasets.<name>.path)."""
    return config["datasets"][wildcards.dataset].get("path") or []


def sae_corpus_file(wildcards):
    """fetch_sae_corpus's local file (config key sae.corpus.path)."""
    return (config["sae"]["corpus"] or {}).get("path") or []


MODEL_SOURCE_SKIPPED = (".bin", ".pt", ".pth")  # never copied (sarm.models._copy_folder)


def model_source_files(wildcards):
    """fetch_model's local source: the files of the model folder (config key model.path; a folder's own mtime
    misses an edited file), else the GGUF file (model.gguf.path) when it exists (else the hub is tried first)."""
    model = config["model"]
    if model["path"]:
        folder = model["path"]
        if not os.path.isdir(folder):
            return []  # fetch_model's script names the key ("config key model.path: ... is not a model folder")
        return sorted(
            entry.path for entry in os.scandir(folder) if entry.is_file() and not entry.name.endswith(MODEL_SOURCE_SKIPPED)
        )
    gguf = (model["gguf"] or {}).get("path")
    return gguf if gguf and os.path.exists(gguf) else []


MODEL_IDENTITY_KEYS = ("name", "hub_id", "revision", "path", "gguf", "trust_remote_code")


def model_identity():
    """fetch_model's params: the keys that say which model is fetched. How it is read (layer, dtype, batch size,
    ...) is not among them, so changing those does not fetch it again."""
    return {key: config["model"][key] for key in MODEL_IDENTITY_KEYS}


def model_settings():
    """config key model as the rules that read the model take it: without model.batch_size, which changes only
    throughput (the scripts read it from the config), so that changing it re-runs nothing; with a pretrained SAE,
    the input it reads (`sae_input`: its hook and normalisation, which the caches follow and record)."""
    settings = {key: value for key, value in config["model"].items() if key != "batch_size"}
    return {**settings, "sae_input": SAE_INPUT} if SAE_INPUT else settings


def eval_dataset_file(wildcards):
    return f"{RESOURCES}/data/{wildcards.table}.parquet"


def _alternatives_or_none(names):
    return _alternatives(names) if names else "(?!)"  # a pattern that matches nothing


def sae_folder(kind):
    """The SAE of a kind: the sequence-level one, or an ablation's (token-level, random-init)."""
    return f"{RESULTS}/sae/{SAE}" if kind == "sequence" else f"{RESULTS}/sae/{SAE}-{kind}"


def reward_inputs(wildcards):
    """Frozen heads read cached features; tuned models read the pair tables (and the SAE they keep)."""
    spec = REWARD_MODELS[wildcards.rm]
    if spec.trains_on_cache:
        inputs = {"model": MODEL_DIR, "train": f"{ACT}/train", "val": f"{ACT}/val"}
    else:
        inputs = {"model": MODEL_DIR, "train": f"{RESOURCES}/tables/train.parquet", "val": f"{RESOURCES}/tables/val.parquet"}
    if spec.reads_sae:
        inputs["sae"] = f"{sae_folder(spec.reads_sae)}/model"
    return inputs


def eval_inputs(wildcards):
    """A frozen model is scored from the cached states of the table; a tuned one from its text."""
    inputs = {"model": f"{RESULTS}/reward/{wildcards.rm}", "pairs": f"{RESOURCES}/tables/{wildcards.table}.parquet"}
    if REWARD_MODELS[wildcards.rm].scored_from_cache:
        inputs["activations"] = f"{ACT}/{wildcards.table}"
    return inputs


SAE_CORPUS = config["sae"]["corpus"]  # a plain-text corpus (the paper's OpenWebText2), or None: the training pairs


def sae_inputs(wildcards):
    """The SAE's corpus (sentence-final states of the plain-text corpus or of the training pairs), the training
    pairs' final tokens (config key sae.include_final_token) and the held-out set."""
    corpus = f"{ACT}/corpus/sentence" if SAE_CORPUS else f"{ACT}/train"
    inputs = {"train": corpus, "pairs": f"{ACT}/train", "val": f"{ACT}/val"}
    pretrained = (config["sae"]["pretrained"] or {}).get("path")
    if pretrained and wildcards.get("sae_kind", "sequence") == "sequence":  # a local SAE folder replaces training
        inputs["pretrained"] = pretrained
    return inputs


def sae_variant_inputs(wildcards):
    """The token-level SAE trains on drawn token states (of the same corpus); the random-init one trains on
    nothing (its inputs give its shape and its held-out metrics)."""
    inputs = sae_inputs(wildcards)
    if wildcards.sae_kind == "token":
        inputs["train"] = f"{ACT}/corpus/token" if SAE_CORPUS else f"{ACT}/tokens/train"
    return inputs


def with_sentences(wildcards):
    """Only the training tables feed the SAE corpus (train) and its held-out metrics (val)."""
    return wildcards.table in ("train", "val")


def sae_settings():
    """The SAE's settings that shape its result (checkpointing does not: changing it re-runs nothing)."""
    return {key: value for key, value in config["sae"].items() if key != "n_checkpoints"}


def gpus():
    return 1 if USES_GPU else 0


# --- Interpretability (workflow/rules/explain.smk): the cards and the preference shift of the reward model named by
# config key explain.reward_model (default `sarm`) ---
EXPLAIN_RM = config["explain"]["reward_model"]
EXPLAIN = f"{RESULTS}/explain/{EXPLAIN_RM}"
SHIFT = f"{RESULTS}/shift/{EXPLAIN_RM}"
EXPLAIN_SPEC = REWARD_MODELS[EXPLAINED] if EXPLAINED else None
EXPLAIN_TUNED = bool(EXPLAIN_SPEC) and EXPLAIN_SPEC.own_backbone  # fine-tuned layers 1..L
# The caches it is read from: the base model's, or (tuned) those of its own fine-tuned layers 1..L.
EXPLAIN_ACT = activations_of(EXPLAINED) if EXPLAINED else ACT
# The evaluation table the cards' firing rates and the shift's target come from (default: the first eval set).
EXPLAIN_TABLE = config["explain"]["table"] or (config["eval"]["datasets"] or ["val"])[0]
SHIFT_TABLE = config["shift"]["table"] or EXPLAIN_TABLE
SHIFT_ON = bool(config["shift"]["categories"] or config["shift"]["subsets"] or config["shift"]["features"])


def cards_title():
    """The cards' title: the model (unless it is the default `sarm`), the base model and layer, for a tuned one its
    mode, and the table."""
    name = "" if EXPLAIN_RM == EXPLAIN_REWARD_MODEL else f" of {EXPLAIN_RM}"
    backbone = f" (layers 1..{LAYER} fine-tuned, mode {EXPLAIN_SPEC.kind})" if EXPLAIN_TUNED else ""
    return f"SARM feature cards{name}: {MODEL} layer {LAYER}{backbone}, {EXPLAIN_TABLE}"


def explain_outputs():
    """Cards, attributions, token-reward pages and the preference shift of the reward model explain.reward_model names (an SAE head,
    frozen or tuned: a tuned one is read through its own backbone); none when the default `sarm` is not one."""
    if not EXPLAINED:
        return []
    outputs = [
        *expand(f"{EXPLAIN}/attributions/{{table}}.parquet", table=EVAL_TABLES),
        f"{EXPLAIN}/cards.html",
    ]
    if config["explain"]["token_rewards"]["n_pairs"]:
        outputs.append(f"{EXPLAIN}/token_rewards")
    if SHIFT_ON:
        outputs += [
            *expand(f"{RESULTS}/tables/preference_shift{{part}}.{{ext}}", part=["", "_features"], ext=["md", "csv"]),
            f"{RESULTS}/figures/preference_shift.png",
        ]
    return outputs


# --- The paper's tables (workflow/rules/tables.smk) and the ablation orderings (workflow/rules/ablations.smk) ---
PAPER_TABLES = ["table1_rewardbench2", "table1_rewardbench_v1", "table1_local", "table2_ablations", "table2_ablations_local"]


def paper_table_outputs():
    return [
        *expand(f"{RESULTS}/tables/{{name}}.{{ext}}", name=PAPER_TABLES, ext=["md", "csv"]),
        f"{RESULTS}/figures/paper_tables.png",
    ]


def paper_reference_folder():
    """Config key paper_tables.reference (published leaderboards); a relative path is relative to the repository,
    so that the default finds ../shared/data from any working directory. None: no leaderboard rows."""
    folder = config["paper_tables"]["reference"]
    return os.path.join(workflow.basedir, folder) if folder else None


def paper_reference(wildcards):
    folder = paper_reference_folder()
    if not folder:
        return {}
    return {name: f"{folder}/{name}_leaderboard.csv" for name in ("rewardbench2", "rewardbench_v1")}


from sarm.ablations import comparisons, reference_model

# the orderings table when a claim compares two trained models, or another model sits beside the SARM head
ABLATION_COMPARISONS = comparisons(REWARD_MODELS) or (len(REWARD_MODELS) > 1 and reference_model(REWARD_MODELS))


def ablation_outputs():
    if not ABLATION_COMPARISONS:
        return []
    return expand(f"{RESULTS}/tables/{{name}}.{{ext}}", name=["ablation_orderings", "variant_comparisons"], ext=["md", "csv"])


# --- Cluster resources, computed from the experiment (the model and its numbers: src/sarm/cluster.py) ---
from sarm import cluster as _cluster
from sarm.workflow import resources as _resources, slurm as _slurm

MODEL_SHAPE = _cluster.model_shape(config, [MODEL_DIR])  # config.json once fetched, else cluster.model_shape


def _estimate(rule, wildcards, attempt):
    table = wildcards.get("table", "bon" if rule == "cache_bon" else None)
    if "positions" in wildcards.keys():  # cache_sae_corpus: the plain-text corpus, sized by its token budget
        table = "corpus"
    # the rule's own threads, as a cluster job gets them (--cores caps them locally and in dry runs)
    threads = workflow.get_rule(rule).resources["_cores"]
    threads = getattr(threads, "value", threads)  # a Snakemake Resource wrapping the int
    threads = threads if isinstance(threads, int) else 1
    rm = wildcards.get("rm")
    return _resources.estimate(rule, config, MODEL_SHAPE, table, REWARD_MODELS[rm] if rm else None, attempt, threads)


def mem_mb_for(rule):
    """Host memory of a job of `rule`: weights of layers 1..L, batch x max_length, data; x attempt."""
    return lambda wildcards, attempt: _estimate(rule, wildcards, attempt)["mem_mb"]


def runtime_for(rule):
    """Minutes of a job of `rule` from its FLOPs (model x tokens, SAE x samples) at the rule's threads;
    x attempt, so a job killed at its time limit comes back (--retries) with more."""
    return lambda wildcards, attempt: _estimate(rule, wildcards, attempt)["runtime"]


def gpus_for(rule):
    """GPUs of a job of `rule`: none when device is cpu; config finetune.gpus for fine-tuning; else 1 on the
    GPU rules (evaluation only for a tuned model, which it scores from text)."""
    return lambda wildcards, attempt: _estimate(rule, wildcards, attempt)["gpu"]


onstart:
    _slurm.check_submission(workflow)


onerror:
    _slurm.explain_slurm_failures(workflow, log)  # why SLURM ended a failed job (time, memory)
