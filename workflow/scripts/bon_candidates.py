import logging

from sarm.align import read_bon
from sarm.workflow import run_script


def main(snakemake):
    p = snakemake.params
    candidates = read_bon(snakemake.input[0], p.max_prompts, p.seed)
    candidates.to_parquet(snakemake.output[0], index=False)
    logging.info(
        "%d prompts x %d candidates from %s", candidates["id"].nunique(), candidates["candidate"].nunique(), snakemake.input[0]
    )


run_script(snakemake, main)
