# Config validation, names and input functions: the logic of the DAG.
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from sarm.config import check
from sarm.errors import SarmError

try:
    check(config, workflow.source_path("../schemas/config.schema.yaml"))  # one line naming the key
except SarmError as err:
    raise WorkflowError(str(err)) from None
validate(config, schema="../schemas/config.schema.yaml")  # fills in the defaults

RESULTS = config["results_dir"]
RESOURCES = config["resources_dir"]
MODEL = config["model"]["name"]
LAYER = config["model"]["layer"]
MODEL_DIR = f"{RESOURCES}/models/{MODEL}"
ACT = f"{RESULTS}/activations/{MODEL}-L{LAYER}"
SAE = f"{MODEL}-L{LAYER}"
TRAINED_MODELS = {"sarm": "sae", "dense": "hidden"}  # reward model -> the features its head reads
BASELINES = ["length"]
EVAL_TABLES = ["val", *config["eval"]["datasets"]]
USES_GPU = config["device"] != "cpu"


def _check_config():
    """What the schema cannot say: cross-references between keys."""
    names = set(config["datasets"])
    for key in ("train", "eval"):
        for name in config[key]["datasets"]:
            if name not in names:
                raise WorkflowError(f"config key {key}.datasets: {name!r} is not defined under datasets")
    for name in config["eval"]["datasets"]:
        if name in ("train", "val"):
            raise WorkflowError(f"config key eval.datasets: {name!r} is reserved for the training tables")
    sae, model = config["sae"], config["model"]
    if sae["width"] is not None and sae["k"] is not None and sae["k"] >= sae["width"]:
        raise WorkflowError(f"config key sae.k = {sae['k']} must be smaller than sae.width = {sae['width']}")
    if not (model["hub_id"] or model["path"] or model["gguf"]):
        raise WorkflowError("config key model: give at least one of hub_id, path or gguf")
    pretrained = sae["pretrained"]
    if pretrained and not (pretrained.get("path") or {"release", "sae_id"} <= set(pretrained)):
        raise WorkflowError("config key sae.pretrained: give {path: ...} or {release: ..., sae_id: ...}")


_check_config()


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    dataset=_alternatives(config["datasets"]),
    table=_alternatives(["train", *EVAL_TABLES]),
    rm=_alternatives(TRAINED_MODELS),


def get_final_output():
    return [
        *expand(f"{RESULTS}/tables/accuracy_{{table}}.{{ext}}", table=EVAL_TABLES, ext=["md", "csv"]),
        *expand(f"{RESULTS}/tables/sae_metrics.{{ext}}", ext=["md", "csv"]),
        f"{RESULTS}/figures/accuracy.png",
    ]


def dataset_spec(wildcards):
    return config["datasets"][wildcards.dataset]


def eval_dataset_file(wildcards):
    return f"{RESOURCES}/data/{wildcards.table}.parquet"


def reward_inputs(wildcards):
    inputs = {"model": MODEL_DIR, "train": f"{ACT}/train", "val": f"{ACT}/val"}
    if TRAINED_MODELS[wildcards.rm] == "sae":
        inputs["sae"] = f"{RESULTS}/sae/{SAE}/model"
    return inputs


def with_sentences(wildcards):
    """Only the training tables feed the SAE corpus (train) and its held-out metrics (val)."""
    return wildcards.table in ("train", "val")


def gpus():
    return 1 if USES_GPU else 0
