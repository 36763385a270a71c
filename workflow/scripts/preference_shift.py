from pathlib import Path

from sarm.activations import ActivationCache
from sarm.data import read_pairs
from sarm.provenance import caches_note
from sarm.reward_model import load_feature_head
from sarm.shift import preference_shift, shift_figure
from sarm.tables import write_table
from sarm.workflow import run_script


def main(snakemake):
    i, o, p = snakemake.input, snakemake.output, snakemake.params
    tables = {t: (ActivationCache(a), read_pairs(q)) for t, a, q in zip(p.tables, i.activations, i.pairs)}
    report, features, responses = preference_shift(load_feature_head(i.model), tables, p.shift, p.target_table, o.model)
    target = f"{p.target_table}: {', '.join(p.shift['categories'] + p.shift['subsets'])}"
    note = caches_note(i.activations)
    write_table(
        report.round(4),
        Path(o.table[0]).with_suffix(""),
        f"Preference shift toward {target}: edited features x {p.shift['factor']}",
        note,
    )
    write_table(features.round(6), Path(o.features[0]).with_suffix(""), f"Edited features (target {target})", note)
    responses.to_parquet(o.responses, index=False)
    shift_figure(
        responses, o.figure, f"preference shift toward {target}: features {features['feature'].tolist()} x {p.shift['factor']}"
    )


run_script(snakemake, main)
