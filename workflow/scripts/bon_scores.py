from sarm.activations import ActivationCache
from sarm.align import read_candidates, score_candidates
from sarm.reward_model import load
from sarm.workflow import run_script


def main(snakemake):
    p, i = snakemake.params, snakemake.input
    candidates = read_candidates(i.candidates)
    scores = None
    for folder in dict.fromkeys(p.caches):  # frozen models share the base model's cache; a tuned one has its own
        reward_models = {name: load(path) for name, path, cache in zip(p.models, i.models, p.caches) if cache == folder}
        part = score_candidates(reward_models, ActivationCache(folder), candidates)
        scores = part if scores is None else scores.join(part[list(reward_models)])
    scores[[*scores.columns.drop(p.models), *p.models]].to_parquet(snakemake.output[0], index=False)


run_script(snakemake, main)
