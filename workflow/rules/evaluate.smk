# Per-example scores and RewardBench-style summaries on every evaluation table, plus the length baseline.


rule evaluate:
    input:
        model=f"{RESULTS}/reward/{{rm}}",
        activations=f"{ACT}/{{table}}",
        pairs=f"{RESOURCES}/tables/{{table}}.parquet",
    output:
        scores=f"{RESULTS}/eval/{{rm}}/{{table}}/scores.parquet",
        summary=f"{RESULTS}/eval/{{rm}}/{{table}}/summary.json",
    threads: 2
    resources:
        mem_mb=mem_mb_for("evaluate"),
        runtime=runtime_for("evaluate"),
    log:
        "logs/evaluate/{rm}/{table}.log",
    script:
        "../scripts/evaluate.py"


rule length_baseline:
    input:
        pairs=f"{RESOURCES}/tables/{{table}}.parquet",
    output:
        scores=f"{RESULTS}/eval/length/{{table}}/scores.parquet",
        summary=f"{RESULTS}/eval/length/{{table}}/summary.json",
    log:
        "logs/evaluate/length/{table}.log",
    script:
        "../scripts/length_baseline.py"
