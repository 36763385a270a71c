# Fetch each data set into one normalised table; build the train / val / eval tables that get cached.


rule fetch_dataset:
    input:
        miniature_dataset_source,  # the stand-in in hub.mirror (config/paper/miniature.yaml); else none
        data=dataset_file,  # the local file (datasets.<name>.path): editing it re-runs the rule
    output:
        f"{RESOURCES}/data/{{dataset}}.parquet",
    params:
        spec=dataset_spec,
        mirror=config["hub"]["mirror"],
    log:
        "logs/fetch_dataset/{dataset}.log",
    localrule: True
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/fetch_dataset.py"


rule train_tables:
    input:
        expand(f"{RESOURCES}/data/{{dataset}}.parquet", dataset=config["train"]["datasets"]),
    output:
        train=f"{RESOURCES}/tables/train.parquet",
        val=f"{RESOURCES}/tables/val.parquet",
    params:
        max_pairs=config["train"]["max_pairs"],
        val_fraction=config["train"]["val_fraction"],
        seed=config["seed"],
    log:
        "logs/train_tables.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/train_tables.py"


rule eval_table:
    input:
        eval_dataset_file,
    output:
        f"{RESOURCES}/tables/{{table}}.parquet",
    params:
        max_per_subset=config["eval"]["max_pairs_per_subset"],
        seed=config["seed"],
    log:
        "logs/eval_table/{table}.log",
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/eval_table.py"


ruleorder: train_tables > eval_table
