import logging

from sarm import models
from sarm.activations import cache_sequences
from sarm.align import read_candidates
from sarm.workflow import run_script


def main(snakemake):
    spec, path = snakemake.params.model, snakemake.input.model
    device = models.resolve_device(snakemake.params.device)
    dtype = models.resolve_dtype(spec["dtype"], device)
    tokenizer = models.load_tokenizer(path, spec["chat_template"], spec["trust_remote_code"])
    model = models.load_truncated(path, spec["layer"], dtype, device, spec["trust_remote_code"])
    sequences = read_candidates(snakemake.input.candidates)[["id", "candidate", "prompt", "response"]]
    meta = {"model": spec["name"], "layer": spec["layer"], "dtype": str(dtype).removeprefix("torch."), "device": device}
    info = cache_sequences(model, tokenizer, sequences, snakemake.output[0], spec["max_length"], spec["batch_size"],
                           device, with_sentences=False, meta=meta, counts={"n_prompts": int(sequences["id"].nunique())})
    logging.info("cached %s", info)


run_script(snakemake, main)
