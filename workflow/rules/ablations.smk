# Whether the paper's orderings hold between the trained variants (sarm.ablations.CLAIMS), and every variant
# beside the paper's SARM head, with paired bootstrap intervals; a target of `rule all` whenever the config
# trains two variants a claim compares or a variant beside the SARM head.


rule ablation_orderings:
    input:
        scores=expand(f"{RESULTS}/eval/{{rm}}/{{table}}/scores.parquet", rm=REWARD_MODELS, table=EVAL_TABLES),
        summaries=expand(f"{RESULTS}/eval/{{rm}}/{{table}}/summary.json", rm=REWARD_MODELS, table=EVAL_TABLES),
    output:
        orderings=expand(f"{RESULTS}/tables/ablation_orderings.{{ext}}", ext=["md", "csv"]),
        variants=expand(f"{RESULTS}/tables/variant_comparisons.{{ext}}", ext=["md", "csv"]),
    params:
        specs=REWARD_PARAMS,
        models=list(REWARD_MODELS),
        tables=EVAL_TABLES,
    log:
        "logs/ablation_orderings.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/ablation_orderings.py"
