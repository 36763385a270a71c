from sarm.models import fetch_model
from sarm.workflow import run_script


def main(snakemake):
    fetch_model(snakemake.params.spec, snakemake.output[0], snakemake.params.mirror)


run_script(snakemake, main)
