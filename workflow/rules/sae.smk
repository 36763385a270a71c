# The sequence-level TopK SAE: trained with sae-lens on sentence-final states (of the training pairs, or of a
# plain-text corpus such as the paper's OpenWebText2: config key sae.corpus), or loaded pretrained.


rule sae:
    input:
        unpack(sae_inputs),
    output:
        model=directory(f"{RESULTS}/sae/{SAE}/model"),
        metrics=f"{RESULTS}/sae/{SAE}/metrics.json",
    params:
        sae=sae_settings(),
        device=config["device"],
        seed=config["seed"],
        layer=LAYER,
        model=MODEL,
    threads: 8
    resources:
        mem_mb=mem_mb_for("sae"),
        runtime=runtime_for("sae"),
        gpu=gpus_for("sae"),  # sae-lens trains on one device
    log:
        f"logs/sae/{SAE}.log",
    benchmark:
        f"logs/benchmarks/sae/{SAE}.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/train_sae.py"


rule sae_variant:
    """The ablations' SAEs: token-level (trained on sampled token states) and random-init (never trained)."""
    input:
        unpack(sae_variant_inputs),
    output:
        model=directory(f"{RESULTS}/sae/{SAE}-{{sae_kind}}/model"),
        metrics=f"{RESULTS}/sae/{SAE}-{{sae_kind}}/metrics.json",
    params:
        sae=sae_settings(),
        device=config["device"],
        seed=config["seed"],
        layer=LAYER,
        model=MODEL,
    threads: 8
    resources:
        mem_mb=mem_mb_for("sae"),
        runtime=runtime_for("sae"),
        gpu=gpus_for("sae"),
    log:
        f"logs/sae/{SAE}-{{sae_kind}}.log",
    benchmark:
        f"logs/benchmarks/sae/{SAE}-{{sae_kind}}.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/train_sae.py"
