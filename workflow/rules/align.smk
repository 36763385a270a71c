# Best-of-N, judged offline: the candidates of a best-of-N file are cached once, scored by every frozen-backbone
# reward model from that one cache (a tuned model with a head from a cache of its own backbone; full_depth
# classifiers are not scored), and each model's pick is judged by the file's win probabilities.


if "bon" in EVAL_TABLES:
    raise WorkflowError("config key eval.datasets: 'bon' is reserved for the best-of-N candidates")


rule bon_candidates:
    input:
        bon_file,
    output:
        f"{RESOURCES}/bon/candidates.parquet",
    params:
        max_prompts=config["bon"]["max_prompts"],
        seed=config["seed"],
    log:
        "logs/bon/candidates.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/bon_candidates.py"


rule cache_bon:
    input:
        model=MODEL_DIR,
        candidates=f"{RESOURCES}/bon/candidates.parquet",
    output:
        directory(f"{ACT}/bon"),
    params:
        model=model_settings(),
        device=config["device"],
        cache_format=CACHE_FORMAT,  # what the shards hold: a cache of an older format re-runs
    threads: 8
    resources:
        mem_mb=mem_mb_for("cache_bon"),
        runtime=runtime_for("cache_bon"),
        gpu=gpus_for("cache_bon"),
    log:
        "logs/cache_activations/bon.log",
    benchmark:
        "logs/benchmarks/cache_activations/bon.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/cache_bon.py"


rule cache_tuned_bon:
    """The candidates through a tuned reward model's own layers 1..L."""
    input:
        model=f"{RESULTS}/reward/{{rm}}",
        candidates=f"{RESOURCES}/bon/candidates.parquet",
    output:
        directory(f"{TUNED_ACT}/{{rm}}/bon"),
    wildcard_constraints:
        rm=_alternatives_or_none(TUNED_HEADS),
    params:
        device=config["device"],
    threads: 8
    resources:
        mem_mb=mem_mb_for("cache_bon"),
        runtime=runtime_for("cache_bon"),
        gpu=gpus_for("cache_bon"),
    log:
        "logs/cache_activations/tuned/{rm}/bon.log",
    benchmark:
        "logs/benchmarks/cache_activations/tuned/{rm}/bon.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/cache_tuned.py"


rule bon_scores:
    input:
        models=expand(f"{RESULTS}/reward/{{rm}}", rm=BON_MODELS),
        activations=bon_caches(),
        candidates=f"{RESOURCES}/bon/candidates.parquet",
    output:
        f"{RESULTS}/bon/scores.parquet",
    params:
        models=BON_MODELS,
        caches=list(BON_CACHE.values()),
    threads: 2
    resources:
        mem_mb=mem_mb_for("bon_scores"),
        runtime=runtime_for("bon_scores"),
    log:
        "logs/bon/scores.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/bon_scores.py"


rule bon_report:
    input:
        unpack(bon_reference),
        scores=f"{RESULTS}/bon/scores.parquet",
        activations=bon_caches(),  # the note naming the dtype and processor the states came from
    output:
        winrate=expand(f"{RESULTS}/tables/bon_winrate.{{ext}}", ext=["md", "csv"]),
        curve=expand(f"{RESULTS}/tables/bon_curve.{{ext}}", ext=["md", "csv"]),
        figure=report(f"{RESULTS}/figures/bon_curve.png", caption="../report/bon.rst", category="Best-of-N"),
    params:
        models=BON_MODELS,
        draws=config["bon"]["curve_draws"],
        seed=config["seed"],
    log:
        "logs/bon/report.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/bon_report.py"
