import logging
import tempfile

import pandas as pd

from sarm import models
from sarm.reward_model import load_feature_head
from sarm.rl import RewardFunction, curve_ends, train_policy
from sarm.tracking import wandb_run
from sarm.workflow import run_script


def main(snakemake):
    p = snakemake.params
    device = models.resolve_device(p.device)
    prompts = pd.read_parquet(snakemake.input.prompts)
    trust = snakemake.config["model"]["trust_remote_code"]  # the config allows the base model's own code, not the folder
    reward = RewardFunction(load_feature_head(snakemake.input.reward, device, trust), p.reward)
    with (
        wandb_run(snakemake.config, "rl_train", f"grpo-{p.reward}", dict(p.settings)) as run,
        tempfile.TemporaryDirectory() as work,
    ):
        history = train_policy(
            p.policy,
            reward,
            prompts,
            p.settings,
            snakemake.output.policy,
            work,
            p.seed,
            device,
            report_to=["wandb"] if run is not None else "none",
        )
    history.to_csv(snakemake.output.history, index=False)
    logging.info("reward / KL / length, first -> last 5 steps: %s", curve_ends(history))


run_script(snakemake, main)
