import logging

import pandas as pd

from sarm.data import read_pairs, split_pairs, write_pairs
from sarm.workflow import run_script


def main(snakemake):
    pairs = pd.concat([read_pairs(path) for path in snakemake.input], ignore_index=True)
    n = snakemake.params.max_pairs
    if n is not None and n < len(pairs):
        pairs = pairs.sample(n=n, random_state=snakemake.params.seed).reset_index(drop=True)
    train, val = split_pairs(pairs, snakemake.params.val_fraction, snakemake.params.seed)
    write_pairs(train, snakemake.output.train)
    write_pairs(val, snakemake.output.val)
    logging.info("train: %d pairs, val: %d pairs (of %d)", len(train), len(val), len(pairs))


run_script(snakemake, main)
