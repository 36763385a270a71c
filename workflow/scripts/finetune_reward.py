import logging
import subprocess

from sarm import models
from sarm.cluster import launch_command
from sarm.data import read_pairs
from sarm.finetune import finetune_reward_model, write_job
from sarm.sae import load_sae
from sarm.tracking import wandb_run
from sarm.workflow import run_script


def main(snakemake):
    p, rm, out = snakemake.params, snakemake.wildcards.rm, snakemake.output[0]
    sae_path = snakemake.input.get("sae")
    gpus = snakemake.resources.gpu
    if gpus > 1:  # data parallel on the job's GPUs: one process each, every one running sarm.finetune
        job = write_job(
            f"{out}.job.json", spec=p.spec, settings=p.finetune, model_dir=snakemake.input.model, model_spec=p.model,
            train=snakemake.input.train, val=snakemake.input.val, out_dir=out, sae=sae_path, device="cuda", seed=p.seed,
        )
        command = launch_command("sarm.finetune", [str(job)], gpus)
        logging.info("launching %s", command)
        with open(snakemake.log[0], "a") as log:  # the processes' output goes to the job's log
            subprocess.run(command, shell=True, check=True, stdout=log, stderr=subprocess.STDOUT)
        return
    train, val = read_pairs(snakemake.input.train), read_pairs(snakemake.input.val)
    if p.finetune["max_pairs"]:
        train = train.head(p.finetune["max_pairs"])
    with wandb_run(snakemake.config, "finetune_reward", rm, {**p.spec, **p.finetune}) as run:
        folder, history = finetune_reward_model(
            p.spec, p.finetune, snakemake.input.model, p.model, train, val, out, load_sae(sae_path) if sae_path else None,
            models.resolve_device(p.device), p.seed, available_mb=snakemake.resources.mem_mb,
            on_log=run.log if run is not None else None,
        )
    history.to_csv(f"{folder}/history.csv", index=False)
    logging.info("%s trained: %s", rm, folder)


run_script(snakemake, main)
