import itertools
import json
from pathlib import Path

import pandas as pd

from sarm.ablations import ordering_table, variant_table
from sarm.provenance import computed_with_note
from sarm.tables import write_table
from sarm.variants import specs_from_dicts
from sarm.workflow import run_script

SCORE = (
    "Score (%) = on RewardBench 2 the official score (best-of-4, Ties; prompts resampled within subsets), elsewhere "
    "the accuracy tables' overall: the mean of the categories, RewardBench v1 subset weights where the subsets are "
    "official; 95 % bootstrap intervals, pairs resampled within categories (the same resamples for both models)"
)


def main(snakemake):
    p = snakemake.params
    scores = {model: {} for model in p.models}
    for (model, table), path in zip(itertools.product(p.models, p.tables), snakemake.input.scores):  # expand order
        scores[model][table] = pd.read_parquet(path)
    specs = specs_from_dicts(p.specs)
    summaries = [json.loads(Path(path).read_text()) for path in snakemake.input.summaries]
    note = computed_with_note(summaries)
    write_table(
        ordering_table(scores, specs),
        Path(snakemake.output.orderings[0]).with_suffix(""),
        f"Do the paper's orderings hold here? {SCORE}",
        note,
    )
    write_table(
        variant_table(scores, specs),
        Path(snakemake.output.variants[0]).with_suffix(""),
        f"Every variant beside the paper's SARM head (no ordering claimed). {SCORE}",
        note,
    )


run_script(snakemake, main)
