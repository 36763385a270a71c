# Markdown + CSV tables and the accuracy figure.


rule tables:
    input:
        summaries=expand(
            f"{RESULTS}/eval/{{model}}/{{table}}/summary.json",
            model=[*TRAINED_MODELS, *BASELINES],
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
        models=[*TRAINED_MODELS, *BASELINES],
        tables=EVAL_TABLES,
    log:
        "logs/tables.log",
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
    script:
        "../scripts/provenance.py"
