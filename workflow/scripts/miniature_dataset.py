import logging

from sarm.miniature import build, write_parquet
from sarm.workflow import run_script


def main(snakemake):
    fmt = snakemake.params.format
    table = build(fmt, snakemake.params.sources, snakemake.params.seed)
    write_parquet(table, snakemake.output[0])
    logging.info(
        "%s split %s: a stand-in of format %s, %d rows, built from %s",
        snakemake.wildcards.hub,
        snakemake.wildcards.split,
        fmt,
        len(table),
        ", ".join(snakemake.input),
    )


run_script(snakemake, main)
