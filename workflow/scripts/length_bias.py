import itertools
import json
from pathlib import Path

import pandas as pd

from sarm.length_bias import bon_note, length_bias_table
from sarm.provenance import computed_with_note
from sarm.tables import write_table
from sarm.workflow import run_script


def main(snakemake):
    p, inp = snakemake.params, snakemake.input
    # the summaries come in `expand` order: models x tables
    summaries = {
        key: json.loads(Path(path).read_text()) for key, path in zip(itertools.product(p.models, p.tables), inp.summaries)
    }
    bon = None
    if "bon" in inp.keys():
        bon = pd.read_csv(inp.bon)
        bon = bon[bon["source"] == "this run"]
    legend = (
        "pearson / spearman: reward vs response length over the scored responses; pair_pearson: r_c - r_r vs "
        f"len_c - len_r over the pairs. {bon_note(bon)}"
    )
    provenance = computed_with_note(summaries.values())
    write_table(
        length_bias_table(summaries, bon),
        Path(snakemake.output[0]).with_suffix(""),
        "Length bias: accuracy (%), reward-length correlations (characters) and best-of-N pick length",
        f"{legend}\n\n{provenance}" if provenance else legend,
    )


run_script(snakemake, main)
