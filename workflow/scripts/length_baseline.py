import json

from sarm.data import read_pairs
from sarm.intervals import interval_summary
from sarm.rewardbench import length_baseline, summarize
from sarm.workflow import run_script


def main(snakemake):
    scores = length_baseline(read_pairs(snakemake.input.pairs))
    scores.to_parquet(snakemake.output.scores, index=False)
    summary = {**summarize(scores, "length"), "interval": interval_summary(scores)}
    with open(snakemake.output.summary, "w") as f:
        json.dump(summary, f, indent=2)


run_script(snakemake, main)
