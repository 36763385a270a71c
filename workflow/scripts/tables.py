import itertools
import json
from pathlib import Path

import pandas as pd

from sarm.provenance import computed_with_note
from sarm.tables import accuracy_figure, accuracy_table, write_table
from sarm.workflow import run_script


def load(path):
    with open(path) as f:
        return json.load(f)


def main(snakemake):
    p = snakemake.params
    # inputs and outputs come in `expand` order: models x tables, and tables x (md, csv)
    summaries = dict(zip(itertools.product(p.models, p.tables), snakemake.input.summaries))
    stems = [Path(path).with_suffix("") for path in snakemake.output.accuracy[::2]]
    figure = {}
    for table, stem in zip(p.tables, stems):
        loaded = {model: load(summaries[model, table]) for model in p.models}
        figure[table] = accuracy_table(loaded)
        note = " (held out from training; it also picks the head's epoch)" if table == "val" else ""
        write_table(figure[table], stem, f"Pair accuracy (%) on {table}{note}", computed_with_note(loaded.values()))
    sae = load(snakemake.input.sae)
    rows = [{"heldout": name.removeprefix("heldout_"), **sae[name]} for name in sae if name.startswith("heldout_")]
    sae_table = pd.DataFrame(rows).assign(width=sae["width"], k=sae["k"]).round(4)
    write_table(
        sae_table, Path(snakemake.output.sae[0]).with_suffix(""), "SAE on held-out activations", computed_with_note([sae])
    )
    accuracy_figure(figure, snakemake.output.figure)


run_script(snakemake, main)
