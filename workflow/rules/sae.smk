# The sequence-level TopK SAE: trained with sae-lens on sentence-final states, or loaded pretrained.


rule sae:
    input:
        train=f"{ACT}/train",
        val=f"{ACT}/val",
    output:
        model=directory(f"{RESULTS}/sae/{SAE}/model"),
        metrics=f"{RESULTS}/sae/{SAE}/metrics.json",
    params:
        sae=config["sae"],
        device=config["device"],
        seed=config["seed"],
        layer=LAYER,
        model=MODEL,
    threads: 8
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpus(),
    log:
        f"logs/sae/{SAE}.log",
    benchmark:
        f"logs/benchmarks/sae/{SAE}.tsv"
    script:
        "../scripts/train_sae.py"
