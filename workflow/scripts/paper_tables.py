import itertools
import json
from pathlib import Path

from sarm.provenance import computed_with_note
from sarm.tables import paper_tables, paper_tables_figure, write_table
from sarm.variants import specs_from_dicts
from sarm.workflow import run_script

TITLES = {
    "table1_rewardbench2": "Table 1: RewardBench 2 (%), published and reproduced on the official benchmark",
    "table1_rewardbench_v1": "RewardBench v1 (%), published and reproduced on the official benchmark",
    "table1_local": "Table 1, local sets (%): measured on local data, with each set's own categories (not RewardBench)",
    "table2_ablations": "Table 2: ablations on RewardBench 2 (%), published and reproduced on the official benchmark",
    "table2_ablations_local": "Table 2, local sets (%): the ablation variants measured on local data (not RewardBench)",
}
NOTE = (
    "Every row names the data set it was measured on. Published rows: arXiv 2508.08746 (SARM) and the RewardBench "
    "leaderboards (config key paper_tables.reference). RewardBench v1 overall = mean of the four sections."
)


def main(snakemake):
    p = snakemake.params
    # summaries come in `expand` order: models x tables
    summaries = {}
    for key, path in zip(itertools.product(p.models, p.tables), snakemake.input.summaries):
        with open(path) as f:
            summaries[key] = json.load(f)
    tables = paper_tables(summaries, specs_from_dicts(p.reward_models), p.reference, p.leaderboard_models, p.backbone, p.stand_in)
    for name, stem in zip(p.names, snakemake.output.tables[::2]):
        title = (
            TITLES[name].replace("the official benchmark", "stand-ins scored the official way") if p.stand_in else TITLES[name]
        )
        write_table(tables[name], Path(stem).with_suffix(""), title, f"{NOTE} {computed_with_note(summaries.values())}".strip())
    paper_tables_figure(tables, snakemake.output.figure)


run_script(snakemake, main)
