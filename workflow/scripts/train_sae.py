import json
import logging

from sarm import checkpoints, models
from sarm.activations import ActivationCache
from sarm.provenance import computed_with
from sarm.sae import load_sae, measure, prepare_sae, save_sae
from sarm.tracking import wandb_run
from sarm.workflow import run_script


def main(snakemake):
    p = snakemake.params
    kind = snakemake.wildcards.get("sae_kind", "sequence")
    train, val = ActivationCache(snakemake.input.train), ActivationCache(snakemake.input.val)
    pairs = ActivationCache(snakemake.input.pairs)  # the training pairs (the same cache unless sae.corpus is set)
    device = models.resolve_device(p.device)
    raw = not (train.meta.get("sae_input") or {"standardize": True})["standardize"]  # a public SAE's raw states
    metadata = {"model_name": p.model, "hook_name": f"hidden_states.{p.layer}" + ("" if raw else ".standardized")}
    name = f"sae-{p.model}-L{p.layer}" + ("" if kind == "sequence" else f"-{kind}")
    with wandb_run(snakemake.config, "sae", name, {**p.sae, "kind": kind}) as run:
        resume_root = f"{snakemake.output.model}.checkpoints"  # kept by Snakemake when the job dies
        settings = {**p.sae, "n_checkpoints": snakemake.config["sae"]["n_checkpoints"]}
        sae, source, seconds = prepare_sae(settings, train, device, p.seed, metadata, run is not None, resume_root, kind, pairs)
        save_sae(sae, snakemake.output.model)
        checkpoints.remove(resume_root)
        saved = load_sae(snakemake.output.model)  # measure what later rules will load
        metrics = {
            "width": saved.cfg.d_sae,
            "k": getattr(saved.cfg, "k", None),
            "d_in": saved.cfg.d_in,
            "kind": kind,
            **source,
            "seconds": round(seconds, 1),
            **measure(saved, val),
            "computed_with": computed_with(None, train),
        }
        if run is not None:
            run.summary.update({f"{k}/{m}": v for k, d in metrics.items() if isinstance(d, dict) for m, v in d.items()})
    with open(snakemake.output.metrics, "w") as f:
        json.dump(metrics, f, indent=2)
    logging.info("SAE metrics: %s", metrics)


run_script(snakemake, main)
