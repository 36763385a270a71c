# Interpretability: per-response attributions, feature cards (statistics, contexts, logit lens, labels), the reward
# at every token of a few evaluation responses (token_rewards: scored from text, on the CPU) and
# the preference shift of the SARM head named by config key explain.reward_model (EXPLAIN_RM, default `sarm`), all
# from cached activations: the base model's for a frozen head, those of its own fine-tuned layers 1..L for a tuned
# one (EXPLAIN_ACT; its targets and paths: workflow/rules/common.smk).


rule attributions:
    input:
        model=f"{RESULTS}/reward/{EXPLAIN_RM}",
        activations=f"{EXPLAIN_ACT}/{{table}}",
        pairs=f"{RESOURCES}/tables/{{table}}.parquet",
    output:
        f"{EXPLAIN}/attributions/{{table}}.parquet",
    resources:
        mem_mb=mem_mb_for("attributions"),
        runtime=runtime_for("attributions"),
    log:
        "logs/explain/attributions/{table}.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/attributions.py"


rule feature_stats:
    input:
        model=f"{RESULTS}/reward/{EXPLAIN_RM}",
        base_model=MODEL_DIR,
        activations=f"{EXPLAIN_ACT}/{EXPLAIN_TABLE}",
        pairs=f"{RESOURCES}/tables/{EXPLAIN_TABLE}.parquet",
        corpus=f"{EXPLAIN_ACT}/train",
        corpus_pairs=f"{RESOURCES}/tables/train.parquet",
    output:
        f"{EXPLAIN}/features.json",
    params:
        explain=config["explain"],
    threads: 2
    resources:
        mem_mb=mem_mb_for("feature_stats"),
        runtime=runtime_for("feature_stats"),
    log:
        "logs/explain/feature_stats.log",
    benchmark:
        "logs/benchmarks/explain/feature_stats.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/feature_stats.py"


rule label_features:
    input:
        features=f"{EXPLAIN}/features.json",
        base_model=MODEL_DIR,
    output:
        f"{EXPLAIN}/labels.json",
    params:
        labels=config["explain"]["labels"],
        device=config["device"],
        chat_template=config["model"]["chat_template"],
        # kept across re-runs (not an output, so Snakemake does not delete it): a re-run does not ask again
        cache=config["explain"]["labels"]["cache"] or f"{RESULTS}/explain/label_cache.json",
    threads: 2
    resources:
        gpu=gpus(),
    log:
        "logs/explain/label_features.log",
    benchmark:
        "logs/benchmarks/explain/label_features.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/label_features.py"


rule feature_cards:
    input:
        features=f"{EXPLAIN}/features.json",
        labels=f"{EXPLAIN}/labels.json",
    output:
        report(f"{EXPLAIN}/cards.html", caption="../report/feature_cards.rst", category="Interpretability"),
    params:
        title=cards_title(),
        n_show=config["explain"]["n_show"],
    log:
        "logs/explain/feature_cards.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/feature_cards.py"


rule token_rewards:
    input:
        model=f"{RESULTS}/reward/{EXPLAIN_RM}",
        base_model=MODEL_DIR,  # the model scores from text: its base model (a tuned one: its own layers 1..L)
        pairs=f"{RESOURCES}/tables/{EXPLAIN_TABLE}.parquet",
    output:
        directory(f"{EXPLAIN}/token_rewards"),
    params:
        n_pairs=config["explain"]["token_rewards"]["n_pairs"],
        top_features=config["explain"]["token_rewards"]["top_features"],
        title=f"Token rewards of {EXPLAIN_RM}: {EXPLAIN_TABLE}",
    threads: 2
    resources:
        mem_mb=mem_mb_for("token_rewards"),
        runtime=runtime_for("token_rewards"),
    log:
        "logs/explain/token_rewards.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/token_rewards.py"


rule preference_shift:
    input:
        model=f"{RESULTS}/reward/{EXPLAIN_RM}",
        activations=expand(f"{EXPLAIN_ACT}/{{table}}", table=EVAL_TABLES),
        pairs=expand(f"{RESOURCES}/tables/{{table}}.parquet", table=EVAL_TABLES),
    output:
        model=directory(f"{SHIFT}/model"),
        table=expand(f"{RESULTS}/tables/preference_shift.{{ext}}", ext=["md", "csv"]),
        features=expand(f"{RESULTS}/tables/preference_shift_features.{{ext}}", ext=["md", "csv"]),
        responses=f"{SHIFT}/responses.parquet",
        figure=report(
            f"{RESULTS}/figures/preference_shift.png",
            caption="../report/preference_shift.rst",
            category="Interpretability",
        ),
    params:
        shift=config["shift"],
        tables=EVAL_TABLES,
        target_table=SHIFT_TABLE,
    threads: 2
    resources:
        mem_mb=mem_mb_for("preference_shift"),
        runtime=runtime_for("preference_shift"),
    log:
        "logs/explain/preference_shift.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/preference_shift.py"
