import logging

from sarm.activations import cache_activations, cache_sequences
from sarm.align import read_candidates
from sarm.data import read_pairs
from sarm.reward_model import load_feature_head
from sarm.workflow import run_script


def main(snakemake):
    i, p = snakemake.input, snakemake.params
    model = load_feature_head(i.model, p.device, snakemake.config["model"]["trust_remote_code"])
    tokenizer, backbone, device, meta = model.backbone()  # its own fine-tuned layers 1..L
    max_length = model.config["base_model"]["max_length"]
    batch_size = snakemake.config["model"]["batch_size"]  # throughput only: not a param, so changing it re-runs nothing
    if "candidates" in i.keys():  # best-of-N
        sequences = read_candidates(i.candidates)[["id", "candidate", "prompt", "response"]]
        info = cache_sequences(
            backbone,
            tokenizer,
            sequences,
            snakemake.output[0],
            max_length,
            batch_size,
            device,
            with_sentences=False,
            meta=meta,
            counts={"n_prompts": int(sequences["id"].nunique())},
        )
    else:
        info = cache_activations(
            backbone,
            tokenizer,
            read_pairs(i.pairs),
            snakemake.output[0],
            max_length,
            batch_size,
            device,
            with_sentences=p.with_sentences,
            meta=meta,
        )
    logging.info("cached %s", info)


run_script(snakemake, main)
