import logging

from sarm.data import read_pairs
from sarm.reward_model import load_feature_head
from sarm.token_rewards import write_pages
from sarm.workflow import run_script


def main(snakemake):
    model = load_feature_head(snakemake.input.model)  # on the CPU: a handful of responses
    pairs = read_pairs(snakemake.input.pairs)
    params = snakemake.params
    pages = write_pages(model, pairs, snakemake.output[0], params.n_pairs, params.top_features, params.title)
    logging.info("%d token-reward pages written to %s", len(pages), snakemake.output[0])


run_script(snakemake, main)
