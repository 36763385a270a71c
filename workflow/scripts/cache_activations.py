import logging

from sarm import models
from sarm.activations import cache_activations
from sarm.data import read_pairs
from sarm.workflow import run_script


def main(snakemake):
    spec, path = snakemake.params.model, snakemake.input.model
    device = models.resolve_device(snakemake.params.device)
    dtype = models.resolve_dtype(spec["dtype"], device)
    tokenizer = models.load_tokenizer(path, spec["chat_template"], spec["trust_remote_code"])
    model = models.load_truncated(path, spec["layer"], dtype, device, spec["trust_remote_code"])
    info = cache_activations(
        model,
        tokenizer,
        read_pairs(snakemake.input.pairs),
        snakemake.output[0],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        device=device,
        with_sentences=snakemake.params.with_sentences,
        meta={"model": spec["name"], "layer": spec["layer"], "dtype": str(dtype).removeprefix("torch."), "device": device},
    )
    logging.info("cached %s", info)


run_script(snakemake, main)
