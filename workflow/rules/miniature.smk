# The paper config in miniature (config/paper/miniature.yaml): stand-ins of the configured hub data sets, and the
# model, built at run time into hub.mirror as `hf download` lays out the hub repos, so the paper's hub ids are read
# through the mirror as on a cluster without internet. What each stand-in is: src/sarm/miniature.py.
# Its settings and input functions: workflow/rules/miniature_common.smk.


if MINIATURE["enabled"]:

    rule miniature_dataset:
        input:
            miniature_source_files,
        output:
            f"{MIRROR}/{{hub}}/data/{{split}}-00000-of-00001.parquet",
        wildcard_constraints:
            hub=_alternatives_or_none(sorted({hub for hub, _ in MIRRORED})),
            split=_alternatives_or_none(sorted({split for _, split in MIRRORED})),
        params:
            format=miniature_format,
            sources=miniature_sources(),
            seed=config["seed"],
        log:
            "logs/miniature/{hub}/{split}.log",
        localrule: True
        conda:
            "../envs/sarm.yaml"
        script:
            "../scripts/miniature_dataset.py"


if miniature_builds_model():

    rule miniature_model:
        input:
            miniature_gguf,
        output:
            directory(f"{MIRROR}/{config['model']['hub_id']}"),
        log:
            "logs/miniature/model.log",
        localrule: True
        conda:
            "../envs/sarm.yaml"
        script:
            "../scripts/miniature_model.py"
