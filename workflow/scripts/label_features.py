import json

from sarm.labels import LabelCache, label_features, make_judge
from sarm.workflow import run_script


def main(snakemake):
    p = snakemake.params
    with open(snakemake.input.features) as f:
        cards = json.load(f)["features"]
    judge = make_judge(p.labels, snakemake.input.base_model, p.device, p.chat_template) if p.labels["n_features"] else None
    labels = label_features(
        cards,
        judge,
        LabelCache(p.cache),
        p.labels["n_features"],
        p.labels["n_contexts"],
        p.labels["retries"],
        p.labels["backoff_s"],
    )
    with open(snakemake.output[0], "w") as f:
        json.dump(labels, f, indent=1, ensure_ascii=False)


run_script(snakemake, main)
