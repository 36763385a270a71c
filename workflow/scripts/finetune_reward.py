import logging
import os
from pathlib import Path

from sarm import models
from sarm.cluster import launch_command
from sarm.finetune import die_with_parent, processes, run_job, run_processes, write_job
from sarm.workflow import run_script


def main(snakemake):
    die_with_parent()  # a killed Snakemake ends this job, and run_processes ends the processes it started
    p, rm, out = snakemake.params, snakemake.wildcards.rm, snakemake.output[0]
    device = models.resolve_device(p.device)
    n = processes(p.finetune, device)
    available_mb = snakemake.resources.mem_mb
    if device == "cpu" and snakemake.resources.get("gpu", 0):  # device: auto found no GPU on the node
        logging.warning(
            "sized for a GPU (config key device: %s) but running on the CPU: the host memory this needs is "
            "not checked against the %s MB declared for a GPU job",
            p.device,
            f"{available_mb:,}",
        )
        available_mb = None
    job = write_job(
        f"{out}.job.json",
        spec=p.spec,
        settings=p.finetune,
        model_dir=snakemake.input.model,
        model_spec=p.model,
        train=snakemake.input.train,
        val=snakemake.input.val,
        out_dir=out,
        sae=snakemake.input.get("sae"),
        device=device,
        seed=p.seed,
        available_mb=available_mb,
        tracking={
            "workflow_config": {k: v for k, v in snakemake.config.items() if k in ("experiment", "wandb", "model")},
            "job_type": "finetune_reward",
            "name": rm,
            "config": {**p.spec, **p.finetune},
        },
    )
    if n == 1:
        run_job(job)
    else:  # data parallel: one process per GPU, or cpu_processes on the CPU, each running sarm.finetune
        command = launch_command("sarm.finetune", [str(job)], n)
        logging.info("launching %s", " ".join(command))
        threads = {"OMP_NUM_THREADS": str(max(1, snakemake.threads // n))}  # the job's threads, shared
        run_processes(command, snakemake.log[0], {**os.environ, **threads})
    Path(job).unlink()
    logging.info("%s trained: %s", rm, out)


run_script(snakemake, main)
