import logging

from sarm.miniature import mirror_model
from sarm.workflow import run_script


def main(snakemake):
    mirror_model({"path": snakemake.input[0]}, snakemake.output[0])
    logging.info("%s converted into %s", snakemake.input[0], snakemake.output[0])


run_script(snakemake, main)
