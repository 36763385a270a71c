from sarm.data import load_pairs, write_pairs
from sarm.workflow import run_script


def main(snakemake):
    pairs, report = load_pairs(snakemake.wildcards.dataset, snakemake.params.spec, snakemake.params.mirror)
    write_pairs(pairs, snakemake.output[0])
    print(f"{snakemake.wildcards.dataset}: {report}")


run_script(snakemake, main)
