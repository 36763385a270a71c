import logging

from sarm.activations import cache_activations
from sarm.data import read_pairs
from sarm.models import load_backbone
from sarm.workflow import run_script


def main(snakemake):
    spec = snakemake.params.model
    batch_size = snakemake.config["model"]["batch_size"]  # throughput only: not a param, so changing it re-runs nothing
    tokenizer, model, device, meta = load_backbone(spec, snakemake.input.model, snakemake.params.device)
    info = cache_activations(
        model,
        tokenizer,
        read_pairs(snakemake.input.pairs),
        snakemake.output[0],
        spec["max_length"],
        batch_size,
        device,
        with_sentences=snakemake.params.with_sentences,
        meta=meta,
        corpus=snakemake.params.get("corpus", "sentence"),
    )
    logging.info("cached %s", info)


run_script(snakemake, main)
