import json

from sarm.activations import ActivationCache
from sarm.data import read_pairs
from sarm.evaluate import score_cached, score_text
from sarm.intervals import interval_summary
from sarm.length_bias import length_correlation
from sarm.provenance import computed_with
from sarm.reward_model import load
from sarm.rewardbench import summarize
from sarm.workflow import run_script


def main(snakemake):
    pairs = read_pairs(snakemake.input.pairs)
    if "activations" in snakemake.input.keys():  # frozen backbone: the cached states
        model = load(snakemake.input.model)
        cache = ActivationCache(snakemake.input.activations)
        scores, where = score_cached(model, cache, pairs), computed_with(model, cache)
    else:  # a tuned backbone: from the text; its own code runs only if the config allows it (model.trust_remote_code)
        trust = snakemake.config["model"]["trust_remote_code"]
        model = load(snakemake.input.model, snakemake.params.device, trust)
        scores = score_text(model, pairs, snakemake.params.batch_size)
        where = computed_with(model, device=snakemake.params.device)
    scores.to_parquet(snakemake.output.scores, index=False)
    summary = {
        **summarize(scores, snakemake.wildcards.rm),
        "interval": interval_summary(scores),
        "length_correlation": length_correlation(scores, pairs),
        "computed_with": where,
    }
    with open(snakemake.output.summary, "w") as f:
        json.dump(summary, f, indent=2)


run_script(snakemake, main)
