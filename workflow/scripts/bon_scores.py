from sarm.activations import ActivationCache
from sarm.align import read_candidates, score_candidates
from sarm.reward import RewardModel
from sarm.workflow import run_script


def main(snakemake):
    reward_models = {name: RewardModel.from_pretrained(path) for name, path in zip(snakemake.params.models, snakemake.input.models)}
    cache = ActivationCache(snakemake.input.activations)
    scores = score_candidates(reward_models, cache, read_candidates(snakemake.input.candidates))
    scores.to_parquet(snakemake.output[0], index=False)


run_script(snakemake, main)
