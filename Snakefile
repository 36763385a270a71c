# SARM: a reward model that is a linear head over sparse-autoencoder features (arXiv 2508.08746).
# Wiring only: the stages live in workflow/rules/, the logic in the `sarm` package.
from snakemake.utils import min_version

min_version("9.0")


# The software of every rule (each has `conda: "../envs/sarm.yaml"`) and of this process, which imports sarm:
# with `--sdm conda`, snakemake builds it and injects it here first.
conda: "workflow/envs/sarm.yaml"


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/miniature_common.smk"
include: "workflow/rules/miniature.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/reward.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/ablations.smk"
include: "workflow/rules/explain.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/rl.smk"


rule all:
    input:
        get_final_output(),
    default_target: True
