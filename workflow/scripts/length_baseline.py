import json

from sarm.data import read_pairs
from sarm.intervals import interval_summary
from sarm.length_bias import length_correlation
from sarm.rewardbench import length_baseline, summarize
from sarm.workflow import run_script


def main(snakemake):
    pairs = read_pairs(snakemake.input.pairs)
    scores = length_baseline(pairs)
    scores.to_parquet(snakemake.output.scores, index=False)
    summary = {
        **summarize(scores, "length"),
        "interval": interval_summary(scores),
        "length_correlation": length_correlation(scores, pairs),
    }
    with open(snakemake.output.summary, "w") as f:
        json.dump(summary, f, indent=2)


run_script(snakemake, main)
