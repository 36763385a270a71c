import json

from sarm.data import read_pairs
from sarm.rewardbench import length_baseline, summarize
from sarm.workflow import run_script


def main(snakemake):
    scores = length_baseline(read_pairs(snakemake.input.pairs))
    scores.to_parquet(snakemake.output.scores, index=False)
    with open(snakemake.output.summary, "w") as f:
        json.dump(summarize(scores, "length"), f, indent=2)


run_script(snakemake, main)
