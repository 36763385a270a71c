import itertools
import json
from pathlib import Path

import pandas as pd

from sarm.ablations import ordering_table
from sarm.provenance import computed_with_note
from sarm.tables import write_table
from sarm.variants import specs_from_dicts
from sarm.workflow import run_script


def main(snakemake):
    p = snakemake.params
    scores = {model: {} for model in p.models}
    for (model, table), path in zip(itertools.product(p.models, p.tables), snakemake.input.scores):  # expand order
        scores[model][table] = pd.read_parquet(path)
    orderings = ordering_table(scores, specs_from_dicts(p.specs))
    title = (
        "Do the paper's orderings hold here? Score (%) = on RewardBench 2 the official score (best-of-4, Ties; "
        "prompts resampled within subsets), elsewhere the accuracy tables' overall: the mean of the categories, "
        "RewardBench v1 subset weights where the subsets are official; "
        "95 % paired bootstrap interval of the difference, pairs resampled within categories"
    )
    summaries = [json.loads(Path(path).read_text()) for path in snakemake.input.summaries]
    write_table(orderings, Path(snakemake.output[0]).with_suffix(""), title, computed_with_note(summaries))


run_script(snakemake, main)
