# Reward models (Bradley-Terry). Frozen mode: a head (zero-init, no bias) on cached features, SAE latents for
# SARM, the standardised hidden state for the dense baseline. Tuned modes (finetune, joint, full_depth): trained
# end to end on token ids with transformers' Trainer, on as many GPUs of one node as config finetune.gpus says
# (finetune.cpu_processes CPU processes without GPUs; torchrun when more than one).


rule train_reward:
    input:
        unpack(reward_inputs),
    output:
        directory(f"{RESULTS}/reward/{{rm}}"),
    wildcard_constraints:
        rm=_alternatives_or_none(FROZEN),
    params:
        spec=lambda wildcards: REWARD_PARAMS[wildcards.rm],
        reward=config["reward"],
        model=model_settings(),
        seed=config["seed"],
    threads: 4
    resources:
        mem_mb=mem_mb_for("train_reward"),
        runtime=runtime_for("train_reward"),
    log:
        "logs/train_reward/{rm}.log",
    benchmark:
        "logs/benchmarks/train_reward/{rm}.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/train_reward.py"


rule finetune_reward:
    input:
        unpack(reward_inputs),
    output:
        directory(f"{RESULTS}/reward/{{rm}}"),
    wildcard_constraints:
        rm=_alternatives_or_none(TUNED),
    params:
        spec=lambda wildcards: REWARD_PARAMS[wildcards.rm],
        finetune=config["finetune"],
        model=model_settings(),
        device=config["device"],
        seed=config["seed"],
    threads: 8
    resources:
        mem_mb=mem_mb_for("finetune_reward"),
        runtime=runtime_for("finetune_reward"),
        gpu=gpus_for("finetune_reward"),
    log:
        "logs/finetune_reward/{rm}.log",
    benchmark:
        "logs/benchmarks/finetune_reward/{rm}.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/finetune_reward.py"
