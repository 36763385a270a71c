import json

import pandas as pd

from sarm.tables import accuracy_figure, accuracy_table, write_table
from sarm.workflow import run_script


def main(snakemake):
    p = snakemake.params
    figure = {}
    for table in p.tables:
        summaries = {}
        for model in p.models:
            with open(f"{p.results}/eval/{model}/{table}/summary.json") as f:
                summaries[model] = json.load(f)
        figure[table] = accuracy_table(summaries)
        note = " (held out from training; it also picks the head's epoch)" if table == "val" else ""
        write_table(figure[table], f"{p.results}/tables/accuracy_{table}", f"Pair accuracy (%) on {table}{note}")
    with open(snakemake.input.sae) as f:
        sae = json.load(f)
    rows = [{"heldout": name.removeprefix("heldout_"), **sae[name]} for name in sae if name.startswith("heldout_")]
    sae_table = pd.DataFrame(rows).assign(width=sae["width"], k=sae["k"]).round(4)
    write_table(sae_table, f"{p.results}/tables/sae_metrics", "SAE on held-out activations")
    accuracy_figure(figure, snakemake.output.figure)


run_script(snakemake, main)
