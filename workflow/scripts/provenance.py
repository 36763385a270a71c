import json

from sarm.provenance import collect
from sarm.workflow import run_script


def main(snakemake):
    with open(snakemake.output[0], "w") as f:
        json.dump(collect(snakemake.config, snakemake.input.model), f, indent=2, default=str)


run_script(snakemake, main)
