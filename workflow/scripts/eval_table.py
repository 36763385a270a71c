import logging

from sarm.data import read_pairs, write_pairs
from sarm.workflow import run_script


def main(snakemake):
    pairs = read_pairs(snakemake.input[0])
    cap = snakemake.params.max_per_subset
    if cap is not None:
        shuffled = pairs.sample(frac=1.0, random_state=snakemake.params.seed)
        pairs = shuffled.groupby("subset", sort=False).head(cap).sort_index().reset_index(drop=True)
    write_pairs(pairs, snakemake.output[0])
    logging.info("%d pairs over %d subsets", len(pairs), pairs["subset"].nunique())


run_script(snakemake, main)
