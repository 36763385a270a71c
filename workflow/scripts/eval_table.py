import logging

from sarm.data import cap_per_subset, read_pairs, write_pairs
from sarm.workflow import run_script


def main(snakemake):
    pairs = cap_per_subset(read_pairs(snakemake.input[0]), snakemake.params.max_per_subset, snakemake.params.seed)
    write_pairs(pairs, snakemake.output[0])
    logging.info("%d pairs over %d subsets", len(pairs), pairs["subset"].nunique())


run_script(snakemake, main)
