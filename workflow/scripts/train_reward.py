import logging

from sarm import checkpoints
from sarm.activations import ActivationCache
from sarm.sae import load_sae
from sarm.tracking import wandb_run
from sarm.variants import spec_from_dict
from sarm.workflow import run_script


def main(snakemake):
    p, rm = snakemake.params, snakemake.wildcards.rm
    spec = spec_from_dict(rm, p.spec)
    sae = load_sae(snakemake.input.sae) if spec.reads_sae else None
    train, val = ActivationCache(snakemake.input.train), ActivationCache(snakemake.input.val)
    resume_root = f"{snakemake.output[0]}.checkpoints"  # kept by Snakemake when the job dies
    with wandb_run(snakemake.config, "train_reward", rm, {**p.spec, **p.reward}) as run:
        model, history = spec.fit_cached(
            train,
            val,
            snakemake.input.model,
            p.model,
            p.reward,
            sae,
            p.seed,
            log=run.log if run is not None else None,
            checkpoint_root=resume_root,
        )
    model.save_pretrained(snakemake.output[0])
    checkpoints.remove(resume_root)
    history.to_csv(f"{snakemake.output[0]}/history.csv", index=False)
    logging.info(
        "%s: selected epoch %s, val accuracy %.3f",
        rm,
        model.config["training"]["selected_epoch"],
        model.config["training"]["val_accuracy"],
    )


run_script(snakemake, main)
