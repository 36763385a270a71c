import json
import logging
import time
from pathlib import Path

from sarm.explain import cards_html
from sarm.workflow import run_script


def main(snakemake):
    start = time.perf_counter()
    stats, labels = (json.loads(Path(path).read_text()) for path in (snakemake.input.features, snakemake.input.labels))
    Path(snakemake.output[0]).write_text(cards_html(stats, labels, snakemake.params.title, snakemake.params.n_show))
    logging.info("%d cards rendered in %.1f s", len(stats["features"]), time.perf_counter() - start)


run_script(snakemake, main)
