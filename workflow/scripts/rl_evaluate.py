import pandas as pd

from sarm import models
from sarm.reward_model import load_feature_head
from sarm.rl import evaluate_policies
from sarm.workflow import run_script


def main(snakemake):
    p = snakemake.params
    device = models.resolve_device(p.device)
    trust = snakemake.config["model"]["trust_remote_code"]  # the config allows the base model's own code, not the folder
    judges = {name: load_feature_head(path, device, trust) for name, path in zip(p.judges, snakemake.input.judges)}
    policies = {"initial": p.initial, "trained": snakemake.input.trained}
    completions, contributions = evaluate_policies(
        policies, pd.read_parquet(snakemake.input.prompts), judges, p.audited, p.max_new_tokens, p.batch_size, device
    )
    completions.to_parquet(snakemake.output.completions, index=False)
    contributions.to_parquet(snakemake.output.contributions, index=False)


run_script(snakemake, main)
