# RL against the reward model (not in `rule all`: run `snakemake --cores 2 rl`): GRPO with TRL on the
# chat policy, then the trained and the initial policy compared on held-out prompts under every trained
# reward model, with an audit of the features whose contributions grew.

RL = config["rl"]
RL_DIR = f"{RESULTS}/rl/{RL['reward']}"
RL_TRAIN_KEYS = [
    "steps", "prompts_per_step", "num_generations", "max_completion_length", "learning_rate", "beta",
    "temperature", "lora", "use_vllm", "gradient_checkpointing",
]
# linear heads over features (RewardModel folders): the audit reads their per-feature contributions
RL_JUDGES = [name for name, spec in REWARD_MODELS.items() if spec.contributions_per_feature]
if RL["reward"] not in RL_JUDGES:
    raise WorkflowError(f"config key rl.reward: {RL['reward']!r} is not a trained SARM or dense-head reward model ({', '.join(RL_JUDGES)})")

RL_OUTPUT = [
    *expand(f"{RL_DIR}/tables/{{table}}.{{ext}}", table=["before_after", "audit"], ext=["md", "csv"]),
    f"{RL_DIR}/figures/curves.png",
]
RL_POLICY_INPUT = [MODEL_DIR] if RL["policy"] is None else []  # a DAG input only when the workflow fetches it
# The policy: rl.policy, or (null) the workflow's own base model, read from the rule's input (snakemake --lint)
rl_policy = lambda wildcards, input: input.policy[0] if input.policy else RL["policy"]


rule rl:
    input:
        RL_OUTPUT,


rule rl_prompts:
    input:
        sets=list(RL["prompts"].values()),
        policy=RL_POLICY_INPUT,
    output:
        f"{RL_DIR}/prompts.parquet",
    params:
        sets=RL["prompts"],
        policy=rl_policy,
        heldout=RL["heldout"],
        max_prompt_tokens=RL["max_prompt_tokens"],
        seed=config["seed"],
    log:
        f"logs/rl/{RL['reward']}/prompts.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/rl_prompts.py"


rule rl_train:
    input:
        prompts=f"{RL_DIR}/prompts.parquet",
        reward=f"{RESULTS}/reward/{RL['reward']}",
        policy=RL_POLICY_INPUT,
    output:
        policy=directory(f"{RL_DIR}/policy"),
        history=f"{RL_DIR}/history.csv",
    params:
        policy=rl_policy,
        reward=RL["reward"],
        settings={k: RL[k] for k in RL_TRAIN_KEYS},
        device=config["device"],
        seed=config["seed"],
    threads: 8
    resources:
        mem_mb=mem_mb_for("rl_train"),
        runtime=runtime_for("rl_train"),
        gpu=gpus_for("rl_train"),
    log:
        f"logs/rl/{RL['reward']}/train.log",
    benchmark:
        f"logs/benchmarks/rl/{RL['reward']}/train.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/rl_train.py"


rule rl_evaluate:
    input:
        prompts=f"{RL_DIR}/prompts.parquet",
        trained=f"{RL_DIR}/policy",
        judges=expand(f"{RESULTS}/reward/{{rm}}", rm=RL_JUDGES),
        policy=RL_POLICY_INPUT,
    output:
        completions=f"{RL_DIR}/eval/completions.parquet",
        contributions=f"{RL_DIR}/eval/contributions.parquet",
    params:
        initial=rl_policy,
        judges=RL_JUDGES,
        audited=RL["reward"],
        max_new_tokens=RL["max_completion_length"],
        batch_size=RL["eval_batch_size"],
        device=config["device"],
    threads: 8
    resources:
        mem_mb=mem_mb_for("rl_evaluate"),
        runtime=runtime_for("rl_evaluate"),
        gpu=gpus_for("rl_evaluate"),
    log:
        f"logs/rl/{RL['reward']}/evaluate.log",
    benchmark:
        f"logs/benchmarks/rl/{RL['reward']}/evaluate.tsv"
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/rl_evaluate.py"


rule rl_tables:
    input:
        completions=f"{RL_DIR}/eval/completions.parquet",
        contributions=f"{RL_DIR}/eval/contributions.parquet",
        history=f"{RL_DIR}/history.csv",
    output:
        before_after=multiext(f"{RL_DIR}/tables/before_after", ".md", ".csv"),
        audit=multiext(f"{RL_DIR}/tables/audit", ".md", ".csv"),
        curves=report(f"{RL_DIR}/figures/curves.png", caption="../report/rl_curves.rst", category="RL"),
    params:
        judges=RL_JUDGES,
        reward=RL["reward"],
        audit_features=RL["audit_features"],
    log:
        f"logs/rl/{RL['reward']}/tables.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/rl_tables.py"
