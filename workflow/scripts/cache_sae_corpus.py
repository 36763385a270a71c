import logging

import pandas as pd

from sarm.activations import cache_texts
from sarm.models import load_backbone
from sarm.workflow import run_script


def main(snakemake):
    spec = snakemake.params.model
    batch_size = snakemake.config["model"]["batch_size"]  # throughput only: not a param, so changing it re-runs nothing
    tokenizer, model, device, meta = load_backbone(spec, snakemake.input.model, snakemake.params.device)
    info = cache_texts(
        model,
        tokenizer,
        pd.read_parquet(snakemake.input.texts),
        snakemake.output[0],
        snakemake.params.max_length,
        batch_size,
        device,
        meta,
        corpus=snakemake.wildcards.positions,
        max_tokens=snakemake.params.max_tokens,
    )
    logging.info("cached %s", info)


run_script(snakemake, main)
