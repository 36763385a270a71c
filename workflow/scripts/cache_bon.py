import logging

from sarm.activations import cache_sequences
from sarm.align import read_candidates
from sarm.models import load_backbone
from sarm.workflow import run_script


def main(snakemake):
    spec = snakemake.params.model
    batch_size = snakemake.config["model"]["batch_size"]  # throughput only: not a param, so changing it re-runs nothing
    tokenizer, model, device, meta = load_backbone(spec, snakemake.input.model, snakemake.params.device)
    sequences = read_candidates(snakemake.input.candidates)[["id", "candidate", "prompt", "response"]]
    info = cache_sequences(
        model,
        tokenizer,
        sequences,
        snakemake.output[0],
        spec["max_length"],
        batch_size,
        device,
        with_sentences=False,
        meta=meta,
        counts={"n_prompts": int(sequences["id"].nunique())},
    )
    logging.info("cached %s", info)


run_script(snakemake, main)
