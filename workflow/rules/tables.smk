# Markdown + CSV tables and the accuracy figure.


rule tables:
    input:
        summaries=expand(
            f"{RESULTS}/eval/{{model}}/{{table}}/summary.json",
            model=[*REWARD_MODELS, *BASELINES],
            table=EVAL_TABLES,
        ),
        sae=f"{RESULTS}/sae/{SAE}/metrics.json",
    output:
        accuracy=expand(f"{RESULTS}/tables/accuracy_{{table}}.{{ext}}", table=EVAL_TABLES, ext=["md", "csv"]),
        sae=expand(f"{RESULTS}/tables/sae_metrics.{{ext}}", ext=["md", "csv"]),
        figure=report(
            f"{RESULTS}/figures/accuracy.png",
            caption="../report/accuracy.rst",
            category="Accuracy",
        ),
    params:
        models=[*REWARD_MODELS, *BASELINES],
        tables=EVAL_TABLES,
    log:
        "logs/tables.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/tables.py"


rule provenance:
    input:
        model=MODEL_DIR,
        tables=rules.tables.output,
    output:
        f"{RESULTS}/provenance.json",
    log:
        "logs/provenance.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/provenance.py"


# The paper's Table 1 (RewardBench 2) and Table 2 (ablations): published rows beside reproduced ones, each row
# naming the data set it was measured on; rows measured on local sets get tables of their own.


rule paper_tables:
    input:
        unpack(paper_reference),
        summaries=expand(
            f"{RESULTS}/eval/{{model}}/{{table}}/summary.json",
            model=[*REWARD_MODELS, *BASELINES],
            table=EVAL_TABLES,
        ),
    output:
        tables=expand(f"{RESULTS}/tables/{{name}}.{{ext}}", name=PAPER_TABLES, ext=["md", "csv"]),
        figure=report(
            f"{RESULTS}/figures/paper_tables.png",
            caption="../report/paper_tables.rst",
            category="Accuracy",
        ),
    params:
        models=[*REWARD_MODELS, *BASELINES],
        tables=EVAL_TABLES,
        names=PAPER_TABLES,
        # name -> spec (features, mode, sae, topk): which reward model is which ablation row of Table 2
        reward_models=REWARD_PARAMS,
        reference=paper_reference_folder(),
        leaderboard_models=config["paper_tables"]["leaderboard_models"],
        backbone=MODEL,
        stand_in=config["miniature"]["enabled"],  # the official sets are the miniature's stand-ins: rows say so
    log:
        "logs/paper_tables.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/paper_tables.py"


# How much each reward tracks response length (training option reward_models.<name>.length_debias): the eval
# summaries' correlations beside accuracy, and best-of-N's mean pick length where best-of-N ran.


rule length_bias:
    input:
        unpack(length_bias_inputs),
    output:
        expand(f"{RESULTS}/tables/length_bias.{{ext}}", ext=["md", "csv"]),
    params:
        models=[*REWARD_MODELS, *BASELINES],
        tables=EVAL_TABLES,
    log:
        "logs/length_bias.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/length_bias.py"
