# Reward heads (Bradley-Terry, zero-init, no bias) on cached features: SARM on SAE latents, the dense
# baseline on the standardised hidden state.


rule train_reward:
    input:
        unpack(reward_inputs),
    output:
        directory(f"{RESULTS}/reward/{{rm}}"),
    params:
        features=lambda wildcards: TRAINED_MODELS[wildcards.rm],
        reward=config["reward"],
        model=config["model"],
        seed=config["seed"],
    threads: 4
    resources:
        mem_mb=mem_mb_for("train_reward"),
        runtime=runtime_for("train_reward"),
    log:
        "logs/train_reward/{rm}.log",
    benchmark:
        "logs/benchmarks/train_reward/{rm}.tsv"
    script:
        "../scripts/train_reward.py"
