import pandas as pd

from sarm.rl import audit, before_after, curves_figure
from sarm.tables import write_table
from sarm.workflow import run_script


def main(snakemake):
    p, out = snakemake.params, snakemake.output
    completions = pd.read_parquet(snakemake.input.completions)
    table = before_after(completions, p.judges)
    write_table(
        table,
        out.before_after[0].removesuffix(".md"),
        f"GRPO on {p.reward}: trained vs initial policy on held-out prompts (win rate: trained over initial, ties half)",
    )
    features = audit(pd.read_parquet(snakemake.input.contributions), p.audit_features)
    write_table(
        features,
        out.audit[0].removesuffix(".md"),
        f"Reward-hacking audit: {p.reward} features whose mean contribution w_i z_i grew most",
    )
    curves_figure(pd.read_csv(snakemake.input.history), out.curves)


run_script(snakemake, main)
