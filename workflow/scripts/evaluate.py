import json

from sarm.activations import ActivationCache
from sarm.data import read_pairs
from sarm.evaluate import score_cached
from sarm.reward import RewardModel
from sarm.rewardbench import summarize
from sarm.workflow import run_script


def main(snakemake):
    model = RewardModel.from_pretrained(snakemake.input.model)
    scores = score_cached(model, ActivationCache(snakemake.input.activations), read_pairs(snakemake.input.pairs))
    scores.to_parquet(snakemake.output.scores, index=False)
    with open(snakemake.output.summary, "w") as f:
        json.dump(summarize(scores, snakemake.wildcards.rm), f, indent=2)


run_script(snakemake, main)
