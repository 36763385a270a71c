# Per-example scores and RewardBench-style summaries on every evaluation table, plus the length baseline.
# Frozen models score the cached states; tuned models (their backbone changed) score the text.


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        scores=f"{RESULTS}/eval/{{rm}}/{{table}}/scores.parquet",
        summary=f"{RESULTS}/eval/{{rm}}/{{table}}/summary.json",
    params:
        batch_size=config["finetune"]["eval_batch_size"],
        device=config["device"],
    threads: 2
    resources:
        mem_mb=mem_mb_for("evaluate"),
        runtime=runtime_for("evaluate"),
        gpu=gpus_for("evaluate"),
    log:
        "logs/evaluate/{rm}/{table}.log",
    conda:
        "../envs/sarm.yaml"
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
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/length_baseline.py"
