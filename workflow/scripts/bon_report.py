from pathlib import Path

import pandas as pd

from sarm.align import curve_figure, published_results, win_rate_curve, win_rates, winrate_table
from sarm.provenance import caches_note
from sarm.tables import write_table
from sarm.workflow import run_script


def main(snakemake):
    p, inp, out = snakemake.params, snakemake.input, snakemake.output
    scores = pd.read_parquet(inp.scores)
    published = published_results(inp.results, inp.get("leaderboard")) if "results" in inp.keys() else None
    n, prompts = scores["candidate"].nunique(), scores["id"].nunique()
    table = winrate_table(win_rates(scores, p.models), published)
    note = caches_note(inp.activations)
    write_table(
        table,
        Path(out.winrate[0]).with_suffix(""),
        f"Best-of-{n} win rate (%) vs the reference on {prompts} prompts; published rows are best-of-16 on 805",
        f"mean_length: the picks' mean length in characters (oracle: the judge's preferred candidate). {note}",
    )
    curve = win_rate_curve(scores, p.models, p.draws, p.seed)
    write_table(
        curve.round(2),
        Path(out.curve[0]).with_suffix(""),
        f"Win rate (%) against N: mean over {p.draws} random candidate subsets per N",
        note,
    )
    curve_figure(curve, published, out.figure)


run_script(snakemake, main)
