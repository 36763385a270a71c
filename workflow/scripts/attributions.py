from sarm.activations import ActivationCache
from sarm.data import read_pairs
from sarm.explain import attribution_table
from sarm.reward_model import load_feature_head
from sarm.workflow import run_script


def main(snakemake):
    model = load_feature_head(snakemake.input.model)
    table = attribution_table(model, ActivationCache(snakemake.input.activations), read_pairs(snakemake.input.pairs))
    table.to_parquet(snakemake.output[0], index=False)


run_script(snakemake, main)
