import logging

import pandas as pd
from transformers import AutoTokenizer

from sarm.rl import load_prompts, split_prompts
from sarm.workflow import run_script


def main(snakemake):
    p = snakemake.params
    prompts = pd.concat([load_prompts(path, source) for source, path in p.sets.items()], ignore_index=True)
    tokenizer = AutoTokenizer.from_pretrained(p.policy)
    prompts = split_prompts(prompts, p.heldout, p.seed, tokenizer, p.max_prompt_tokens)
    prompts.to_parquet(snakemake.output[0], index=False)
    logging.info("prompts per source and split:\n%s", prompts.groupby(["source", "split"]).size().to_string())


run_script(snakemake, main)
