# Hidden states of layers 1..L: final-token reward features and the sentence-final SAE corpus.


rule cache_activations:
    input:
        model=MODEL_DIR,
        pairs=f"{RESOURCES}/tables/{{table}}.parquet",
    output:
        directory(f"{ACT}/{{table}}"),
    params:
        model=config["model"],
        device=config["device"],
        with_sentences=with_sentences,
    threads: 8
    resources:
        mem_mb=mem_mb_for("cache_activations"),
        runtime=runtime_for("cache_activations"),
        gpu=gpus_for("cache_activations"),
    log:
        "logs/cache_activations/{table}.log",
    benchmark:
        "logs/benchmarks/cache_activations/{table}.tsv"
    script:
        "../scripts/cache_activations.py"


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
        model=config["model"],
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
    script:
        "../scripts/cache_activations.py"
