import json
import logging
import time

from sarm.activations import ActivationCache
from sarm.data import read_pairs
from sarm.explain import feature_stats
from sarm.reward_model import load_feature_head
from sarm.workflow import run_script


def main(snakemake):
    i, p = snakemake.input, snakemake.params.explain
    start = time.perf_counter()
    stats = feature_stats(
        load_feature_head(i.model, trust_remote_code=snakemake.config["model"]["trust_remote_code"]),
        ActivationCache(i.activations),
        read_pairs(i.pairs),
        ActivationCache(i.corpus),
        read_pairs(i.corpus_pairs),
        i.base_model,
        p["n_weight"],
        p["n_frequent"],
        p["features"],
        p["n_contexts"],
        p["logit_lens_tokens"],
    )
    with open(snakemake.output[0], "w") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    logging.info("%d feature cards' statistics in %.1f s", len(stats["features"]), time.perf_counter() - start)


run_script(snakemake, main)
