import logging

from sarm.data import load_texts
from sarm.workflow import run_script


def main(snakemake):
    texts = load_texts(snakemake.params.spec, snakemake.params.mirror)
    texts.to_parquet(snakemake.output[0], index=False)
    logging.info("%d documents, %d characters", len(texts), int(texts["text"].str.len().sum()))


run_script(snakemake, main)
