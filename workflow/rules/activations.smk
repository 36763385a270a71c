# Hidden states of layers 1..L: final-token reward features and the sentence-final SAE corpus (of the base model;
# a tuned reward model's own layers 1..L: cache_tuned_activations).


rule cache_activations:
    input:
        model=MODEL_DIR,
        pairs=f"{RESOURCES}/tables/{{table}}.parquet",
    output:
        directory(f"{ACT}/{{table}}"),
    params:
        model=model_settings(),
        device=config["device"],
        with_sentences=with_sentences,
        cache_format=CACHE_FORMAT,  # what the shards hold: a cache of an older format re-runs
    threads: 8
    resources:
        mem_mb=mem_mb_for("cache_activations"),
        runtime=runtime_for("cache_activations"),
        gpu=gpus_for("cache_activations"),
    log:
        "logs/cache_activations/{table}.log",
    benchmark:
        "logs/benchmarks/cache_activations/{table}.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/cache_activations.py"


rule cache_tuned_activations:
    """States of a table through a tuned reward model's own layers 1..L (loaded as its scoring loads them), for the
    interpretability rules of a tuned SARM: what they read scores as the model scores the text."""
    input:
        model=f"{RESULTS}/reward/{{rm}}",
        pairs=f"{RESOURCES}/tables/{{table}}.parquet",
    output:
        directory(f"{TUNED_ACT}/{{rm}}/{{table}}"),
    wildcard_constraints:
        rm=_alternatives_or_none(TUNED_HEADS),
    params:
        device=config["device"],
        with_sentences=tuned_with_sentences,
    threads: 8
    resources:
        mem_mb=mem_mb_for("cache_activations"),
        runtime=runtime_for("cache_activations"),
        gpu=gpus_for("cache_activations"),
    log:
        "logs/cache_activations/tuned/{rm}/{table}.log",
    benchmark:
        "logs/benchmarks/cache_activations/tuned/{rm}/{table}.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/cache_tuned.py"


rule cache_token_corpus:
    """The token-level SAE's corpus: states at uniformly drawn token positions, as many as sentence ends."""
    input:
        model=MODEL_DIR,
        pairs=f"{RESOURCES}/tables/{{table}}.parquet",
    output:
        directory(f"{ACT}/tokens/{{table}}"),
    wildcard_constraints:
        table="train|val",
    params:
        model=model_settings(),
        device=config["device"],
        with_sentences=True,
        corpus="token",
    threads: 8
    resources:
        mem_mb=mem_mb_for("cache_activations"),
        runtime=runtime_for("cache_activations"),
        gpu=gpus_for("cache_activations"),
    log:
        "logs/cache_activations/tokens/{table}.log",
    benchmark:
        "logs/benchmarks/cache_activations/tokens/{table}.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/cache_activations.py"


rule fetch_sae_corpus:
    """The plain-text SAE corpus of config key sae.corpus (the hub is read on the login node)."""
    input:
        sae_corpus_file,  # a local corpus file (sae.corpus.path); none for a hub corpus
    output:
        f"{RESOURCES}/corpus/sae.parquet",
    params:
        spec=config["sae"]["corpus"],
        mirror=config["hub"]["mirror"],
    log:
        "logs/fetch_sae_corpus.log",
    localrule: True
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/fetch_sae_corpus.py"


rule cache_sae_corpus:
    """States of the plain-text SAE corpus: at sentence ends, or (`token`) at uniformly drawn positions."""
    input:
        model=MODEL_DIR,
        texts=f"{RESOURCES}/corpus/sae.parquet",
    output:
        directory(f"{ACT}/corpus/{{positions}}"),
    wildcard_constraints:
        positions="sentence|token",
    params:
        model=model_settings(),
        device=config["device"],
        max_length=(config["sae"]["corpus"] or {}).get("max_length") or config["model"]["max_length"],
        max_tokens=(config["sae"]["corpus"] or {}).get("max_tokens"),
    threads: 8
    resources:
        mem_mb=mem_mb_for("cache_activations"),
        runtime=runtime_for("cache_activations"),
        gpu=gpus_for("cache_activations"),
    log:
        "logs/cache_activations/corpus-{positions}.log",
    benchmark:
        "logs/benchmarks/cache_activations/corpus-{positions}.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/cache_sae_corpus.py"
