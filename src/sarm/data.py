"""Turn each configured preference data set into one normalised table of (prompt, chosen, rejected) pairs.

A pair table has the columns in `COLUMNS` (`sarm.schema`). `prompt` is the conversation before the judged
response, a list of `{"role", "content"}` messages; `chosen` and `rejected` are the two final assistant responses.
Each source format has a row adapter in `FORMATS`; rows an adapter cannot use are skipped and counted.

Optional columns (`OPTIONAL_COLUMNS`) travel with a table when it has them: a RewardBench 2 row (one prompt,
several correct and incorrect completions) becomes several pairs that share `group` (the row's id) and name
the completions they compare (`chosen_index`, `rejected_index`); a data set that is an official benchmark
(`benchmark_of_spec`) has a `benchmark` column.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sarm.errors import SarmError
from sarm.schema import (
    BENCHMARK_COLUMN,
    BENCHMARKS,
    COLUMNS,
    GROUP_COLUMNS,
    LOCAL,
    OFFICIAL_SOURCES,
    OPTIONAL_COLUMNS,
    SECTIONS,
    benchmark,
)

log = logging.getLogger(__name__)

# COLUMNS, OPTIONAL_COLUMNS (the pair table) and OFFICIAL_SOURCES (how a hub data set is recognised as an official
# benchmark: `Benchmark.sources`) come from sarm.schema.
_V1_SECTION = {subset: section for section, subsets in SECTIONS.items() for subset in subsets}

ROLES = ("system", "user", "assistant")
_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


class _Skip(Exception):
    """Raised by a row adapter for a row that cannot become a pair; the argument is the skip reason."""


def _one_line(error: BaseException) -> str:
    """An exception as `Type: first line of message`, so that SarmError messages stay on one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------------------
# Row adapters. Each takes (row, dataset name, config entry) and returns prompt, chosen, rejected, subset, category.
# ---------------------------------------------------------------------------------------------------------------


def _response(value: Any) -> str:
    """Check one response text; skip the row if it is missing, not a string or blank."""
    if value is None:
        raise _Skip("missing_response")
    if not isinstance(value, str):
        raise _Skip("non_string_response")
    if not value.strip():
        raise _Skip("empty_response")
    return value


def _user_prompt(value: Any) -> list[dict]:
    """A single-turn prompt string as a one-message conversation."""
    if not isinstance(value, str) or not value.strip():
        raise _Skip("missing_prompt")
    return [{"role": "user", "content": value}]


def _labels(row: dict, name: str, spec: dict) -> tuple[str, str]:
    """(subset, category): the row's own values if given, else the dataset name / config category / subset."""
    subset = row.get("subset")
    subset = subset if isinstance(subset, str) and subset else name
    category = row.get("category")
    category = category if isinstance(category, str) and category else spec.get("category") or subset
    return subset, category


def _parse_hh_prompt(prefix: str) -> list[dict]:
    """Parse `\\n\\nHuman: …\\n\\nAssistant: …\\n\\nHuman: …` into alternating user/assistant messages.

    Turns that do not alternate (e.g. an assistant text holding its own `\\n\\nAssistant:`) make the row
    malformed: chat templates commonly require alternating roles.
    """
    parts = _TURN.split(prefix)
    # parts = [text before the first turn, role, text, role, text, ...]
    if parts[0].strip() or len(parts) < 3:
        raise _Skip("malformed_transcript")
    messages = []
    for i, (speaker, text) in enumerate(zip(parts[1::2], parts[2::2])):
        role = "user" if speaker == "Human" else "assistant"
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise _Skip("malformed_transcript")
        messages.append({"role": role, "content": text.strip()})
    if messages[-1]["role"] != "user":
        raise _Skip("malformed_transcript")
    return messages


def _split_hh(transcript: Any) -> tuple[str, str]:
    """(prefix, response) of one HH transcript, split at its last `\\n\\nAssistant:`."""
    text = _response(transcript)
    prefix, marker, response = text.rpartition(_ASSISTANT)
    if not marker:
        raise _Skip("malformed_transcript")
    return prefix, _response(response).strip()


def _hh_rlhf(row: dict, name: str, spec: dict) -> dict:
    """Anthropic HH-RLHF: two full transcripts that share everything up to the last assistant turn."""
    chosen_prefix, chosen = _split_hh(row.get("chosen"))
    rejected_prefix, rejected = _split_hh(row.get("rejected"))
    if chosen_prefix != rejected_prefix:
        raise _Skip("malformed_transcript")
    subset, category = _labels(row, name, spec)
    return dict(prompt=_parse_hh_prompt(chosen_prefix), chosen=chosen, rejected=rejected, subset=subset, category=category)


def _rewardbench(row: dict, name: str, spec: dict) -> dict:
    """RewardBench columns: a prompt string, two response strings and a subset (category optional).

    Without a category (in the row or the config entry), an official RewardBench v1 subset falls in its v1
    section (Chat, Chat Hard, Safety, Reasoning), any other subset in a category of its own name.
    """
    subset, category = _labels(row, name, spec)
    given = row.get("category")
    if not (isinstance(given, str) and given) and not spec.get("category"):
        category = _V1_SECTION.get(subset, category)
    return dict(
        prompt=_user_prompt(row.get("prompt")),
        chosen=_response(row.get("chosen")),
        rejected=_response(row.get("rejected")),
        subset=subset,
        category=category,
    )


def _response_list(value: Any) -> list[str]:
    """A non-empty list of response texts (RewardBench 2's `chosen` / `rejected`)."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise _Skip("malformed_completions")
    if len(value) == 0:
        raise _Skip("missing_response")
    return [_response(text) for text in value]


def _rewardbench2(row: dict, name: str, spec: dict) -> list[dict]:
    """RewardBench 2: a prompt string, lists of correct (`chosen`) and incorrect (`rejected`) completions.

    The row becomes max(c, r) pairs, pair k comparing chosen[k % c] with rejected[k % r], so every completion
    is scored at least once: 1 chosen + 3 rejected gives 3 pairs; a Ties row with 4 correct and 6 incorrect
    gives 6. `chosen_index` / `rejected_index` name the completions; `load_pairs` adds `group` (the row id).
    Identical texts on both sides are kept: best-of-n scoring counts them as a tie, as the official code does.
    """
    chosen, rejected = _response_list(row.get("chosen")), _response_list(row.get("rejected"))
    for key, count in (("num_correct", len(chosen)), ("num_incorrect", len(rejected))):
        if row.get(key) is not None and row[key] != count:
            raise _Skip("counts_disagree")
    prompt = _user_prompt(row.get("prompt"))
    subset, category = _labels(row, name, spec)
    c, r = len(chosen), len(rejected)
    return [
        dict(
            prompt=prompt,
            chosen=chosen[k % c],
            rejected=rejected[k % r],
            subset=subset,
            category=category,
            chosen_index=k % c,
            rejected_index=k % r,
        )
        for k in range(max(c, r))
    ]


def _messages(value: Any) -> list[dict]:
    """Validate a list of chat messages, keeping only role and content."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise _Skip("malformed_transcript")
    messages = []
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _Skip("malformed_transcript")
        if not isinstance(message.get("content"), str):
            raise _Skip("malformed_transcript")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _chat_side(value: Any) -> tuple[list[dict], str]:
    """(messages before the response, response) of one side: a response string or a message list."""
    if isinstance(value, str) or value is None:
        return [], _response(value)
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
        raise _Skip("malformed_transcript")
    *before, last = value
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise _Skip("malformed_transcript")
    return _messages(before), _response(last.get("content"))


def _chat(row: dict, name: str, spec: dict) -> dict:
    """Chat messages: chosen/rejected end in the judged assistant message and share the messages before it.

    When chosen/rejected hold only the response (a string or a one-message list), the prompt comes from
    the `prompt` column, a string or a list of messages.
    """
    chosen_prompt, chosen = _chat_side(row.get("chosen"))
    rejected_prompt, rejected = _chat_side(row.get("rejected"))
    if chosen_prompt != rejected_prompt:
        raise _Skip("malformed_transcript")
    prompt = chosen_prompt
    if not prompt:
        given = row.get("prompt")
        prompt = _user_prompt(given) if isinstance(given, str) or given is None else _messages(given)
        if not prompt:
            raise _Skip("missing_prompt")
    subset, category = _labels(row, name, spec)
    return dict(prompt=prompt, chosen=chosen, rejected=rejected, subset=subset, category=category)


def _llmbar(row: dict, name: str, spec: dict) -> dict:
    """LLMBar: an instruction, two outputs and `label` (1 or 2) naming the better output."""
    label = row.get("label")
    if label not in (1, 2) or isinstance(label, bool):
        raise _Skip("bad_label")
    outputs = {1: _response(row.get("output_1")), 2: _response(row.get("output_2"))}
    subset, category = _labels(row, name, spec)
    return dict(
        prompt=_user_prompt(row.get("input")),
        chosen=outputs[label],
        rejected=outputs[3 - label],
        subset=subset,
        category=category,
    )


# An adapter returns one pair, or (grouped formats) a list of the pairs of one prompt.
FORMATS: dict[str, Callable[[dict, str, dict], dict | list[dict]]] = {
    "hh_rlhf": _hh_rlhf,
    "rewardbench": _rewardbench,
    "rewardbench2": _rewardbench2,
    "chat": _chat,
    "llmbar": _llmbar,
}

# Columns that label a row for the summaries: when a source has one, each of its rows must have it.
LABEL_COLUMNS = ("subset", "category")

# Columns a source must have (in at least one row) for each format.
_REQUIRED = {
    "hh_rlhf": ("chosen", "rejected"),
    "rewardbench": ("prompt", "chosen", "rejected", "subset"),
    "rewardbench2": ("id", "prompt", "chosen", "rejected", "subset"),  # Ties needs its ref:/tied: ids
    "chat": ("chosen", "rejected"),
    "llmbar": ("input", "output_1", "output_2", "label"),
}


# ---------------------------------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------------------------------


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SarmError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None


def _json_records(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SarmError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise SarmError(f"{path}: a JSON object must hold exactly one list of rows, found {len(lists)}")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise SarmError(f"{path}: expected a JSON list of objects")
    return data


def _jsonl_records(path: Path, text: str) -> list[dict]:
    rows = []
    # split at "\n" only: str.splitlines also splits at U+2028, U+0085, \x1c.., which JSON strings may hold raw
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SarmError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SarmError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_records(path: str | os.PathLike) -> list[dict]:
    """Rows of a `.jsonl`, `.json` (a list, or an object holding one list) or `.parquet` file, each optionally `.gz`."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1:] == [".gz"]
    kind = (suffixes[:-1] if compressed else suffixes)[-1:]
    if kind not in ([".jsonl"], [".json"], [".parquet"]):
        raise SarmError(f"{path}: unknown file type (expected .jsonl, .json or .parquet, optionally .gz)")
    if not path.is_file():
        raise SarmError(f"{path}: no such file")
    try:
        data = path.read_bytes()
        if compressed:
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise SarmError(f"{path}: cannot read, corrupt or truncated ({_one_line(e)})") from None
    if kind == [".parquet"]:
        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise SarmError(f"{path}: invalid parquet ({_one_line(e)})") from None
    text = _decode(path, data)
    return _jsonl_records(path, text) if kind == [".jsonl"] else _json_records(path, text)


def load_hub_records(
    hub_id: str, split: str, config_name: str | None = None, mirror: str | None = None, revision: str | None = None
) -> list[dict]:
    """Rows of a Hugging Face hub data set, read from `mirror/hub_id` when that folder exists, else from the hub."""
    import datasets  # slow to import; only needed for hub data

    local = Path(mirror) / hub_id if mirror else None
    try:
        if local is not None and local.is_dir():
            tried = f"mirror {local}"
            dataset = datasets.load_dataset(str(local), name=config_name, split=split)
        else:
            tried = f"mirror {local} not found" if local is not None else "no mirror configured"
            dataset = datasets.load_dataset(hub_id, name=config_name, split=split, revision=revision)
        return dataset.to_list()
    except Exception as e:  # datasets raises many unrelated types (connection, file, value errors)
        raise SarmError(f"cannot load hub data set {hub_id!r} split {split!r} ({tried}): {_one_line(e)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Building the pair table
# ---------------------------------------------------------------------------------------------------------------


def _check_spec(name: str, spec: dict) -> None:
    if not isinstance(spec, dict):
        raise SarmError(f"dataset {name}: the config entry must be a mapping")
    if ("path" in spec) == ("hub" in spec):
        raise SarmError(f"dataset {name}: give exactly one of 'path' or 'hub'")
    if spec.get("format") not in FORMATS:
        raise SarmError(f"dataset {name}: 'format' must be one of {sorted(FORMATS)}, got {spec.get('format')!r}")
    max_pairs = spec.get("max_pairs")
    if max_pairs is not None and (not isinstance(max_pairs, int) or isinstance(max_pairs, bool) or max_pairs < 1):
        raise SarmError(f"dataset {name}: 'max_pairs' must be a positive integer, got {max_pairs!r}")
    key = spec.get("benchmark")
    if key is not None and not (isinstance(key, str) and key in BENCHMARKS):
        raise SarmError(f"dataset {name}: 'benchmark' must be one of {list(BENCHMARKS)}, got {key!r}")
    bench = BENCHMARKS.get(key)
    if bench is not None and bench.format is not None and spec["format"] != bench.format:
        raise SarmError(f"dataset {name}: 'benchmark' {bench.key} needs 'format' {bench.format}")


def benchmark_of_spec(spec: dict) -> str:
    """The key of the benchmark a configured data set is: its `benchmark` key, else the benchmark whose
    `sources` hold its (hub, split, format): "rewardbench-v1" for allenai/reward-bench (split filtered),
    "rewardbench-2" for allenai/reward-bench-2 (split test); else "local"."""
    if spec.get("benchmark"):
        return spec["benchmark"]
    return OFFICIAL_SOURCES.get((spec.get("hub"), spec.get("split", "train"), spec.get("format")), LOCAL.key)


def _sampling_unit(table: pd.DataFrame) -> pd.Series:
    """What a sample keeps or drops whole: a pair, or a grouped table's prompt. The Ties groups `ref:<n>` and
    `tied:<n>` are one prompt, scored together."""
    if "group" not in table.columns:
        return pd.Series(np.arange(len(table)), index=table.index).astype(str)
    group = table["group"].astype(str)
    linked = group.str.match(r"^(ref|tied):")
    return table["subset"].astype(str) + "\x00" + group.where(~linked, "ties:" + group.str.partition(":")[2])


def sample_units(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The rows of n sampling units (pairs, or prompts of a grouped table) from a seeded shuffle, in table order."""
    units = _sampling_unit(table)
    distinct = units.unique()
    if n >= len(distinct):
        return table
    keep = set(distinct[np.random.default_rng(seed).permutation(len(distinct))[:n]])
    return table[units.isin(keep).to_numpy()].reset_index(drop=True)


def cap_per_subset(pairs: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    """At most `cap` pairs per subset (a grouped table: `cap` prompts, each with all its pairs), seeded, in order."""
    if cap is None:
        return pairs
    if "group" not in pairs.columns:
        shuffled = pairs.sample(frac=1.0, random_state=seed)
        return shuffled.groupby("subset", sort=False).head(cap).sort_index().reset_index(drop=True)
    units = _sampling_unit(pairs)
    order = units.drop_duplicates().sample(frac=1.0, random_state=seed)
    kept = order.groupby(pairs.loc[order.index, "subset"], sort=False).head(cap)
    return pairs[units.isin(set(kept)).to_numpy()].reset_index(drop=True)


def load_pairs(name: str, spec: dict, mirror: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The normalised pair table of one configured data set, and a report {rows_read, pairs_kept, skipped}."""
    _check_spec(name, spec)
    if "path" in spec:
        source = str(spec["path"])
        records = read_records(source)
    else:
        source = spec["hub"]
        records = load_hub_records(source, spec.get("split", "train"), spec.get("config_name"), mirror, spec.get("revision"))
    if not records:
        raise SarmError(f"dataset {name}: {source} has no rows")
    columns = set().union(*records)
    for column in _REQUIRED[spec["format"]]:
        if column not in columns:
            raise SarmError(f"dataset {name}: column {column!r} missing from {source} (columns: {sorted(columns)})")

    adapter = FORMATS[spec["format"]]
    # A source that labels its rows labels every row: one row without a subset or category would otherwise
    # become a category of its own (named after the data set), weighted like a whole section in the summary.
    # (A category in the config entry is the fallback the person asked for.)
    labelled = [column for column in LABEL_COLUMNS if column in columns and not (column == "category" and spec.get("category"))]
    pairs, skipped, seen = [], Counter(), set()
    for index, row in enumerate(records):
        try:
            for column in labelled:
                if not (isinstance(row.get(column), str) and row[column].strip()):
                    raise _Skip(f"missing_{column}")
            pair = adapter(row, name, spec)
            if isinstance(pair, dict) and pair["chosen"] == pair["rejected"]:
                raise _Skip("identical_responses")
        except _Skip as skip:
            skipped[skip.args[0]] += 1
            continue
        row_id = row.get("id")
        row_id = f"{name}-{index}" if row_id is None else str(row_id)
        if row_id in seen:
            raise SarmError(f"dataset {name}: duplicated id {row_id!r} in {source}")
        seen.add(row_id)
        if isinstance(pair, dict):
            pairs.append({"id": row_id, **pair, "dataset": name})
        else:  # the pairs of one prompt
            pairs.extend({"id": f"{row_id}/{k}", **p, "dataset": name, "group": row_id} for k, p in enumerate(pair))

    if skipped:
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items()))
        log.warning("dataset %s: skipped %d of %d rows from %s (%s)", name, sum(skipped.values()), len(records), source, reasons)
    if not pairs:
        raise SarmError(f"dataset {name}: no valid pairs in {source} ({len(records)} rows read)")
    grouped = "group" in pairs[0]
    max_pairs = spec.get("max_pairs")
    if max_pairs is not None and max_pairs < len(pairs) and not grouped:
        # The first max_pairs of a seeded shuffle, kept in source order.
        keep = np.sort(np.random.default_rng(spec.get("seed", 0)).permutation(len(pairs))[:max_pairs])
        pairs = [pairs[i] for i in keep]
    table = pd.DataFrame(pairs, columns=[*COLUMNS, *GROUP_COLUMNS] if grouped else COLUMNS)
    if grouped and max_pairs is not None:  # a grouped table keeps max_pairs whole prompts
        table = sample_units(table, max_pairs, spec.get("seed", 0))
    bench = benchmark(benchmark_of_spec(spec))
    if bench.official:
        table[BENCHMARK_COLUMN] = bench.key
    return table, {"rows_read": len(records), "pairs_kept": len(table), "skipped": dict(skipped)}


# ---------------------------------------------------------------------------------------------------------------
# Storing and splitting
# ---------------------------------------------------------------------------------------------------------------


def write_pairs(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a pair table to parquet atomically (a temporary file in the same folder, then renamed)."""
    path = Path(path)
    missing = [column for column in COLUMNS if column not in df.columns]
    if missing:
        raise SarmError(f"{path}: cannot write pairs, columns missing: {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [*COLUMNS, *(column for column in OPTIONAL_COLUMNS if column in df.columns)]
    table = pa.Table.from_pandas(df[columns], preserve_index=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_pairs(path: str | os.PathLike) -> pd.DataFrame:
    """Read a pair table written by `write_pairs` (with its optional columns); `prompt` comes back as lists of
    plain dicts."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise SarmError(f"{path}: cannot read pairs ({_one_line(e)})") from None
    missing = [column for column in COLUMNS if column not in table.column_names]
    if missing:
        raise SarmError(f"{path}: not a pair table, columns missing: {missing}")
    columns = [*COLUMNS, *(column for column in OPTIONAL_COLUMNS if column in table.column_names)]
    df = table.select([c for c in columns if c != "prompt"]).to_pandas()
    df.insert(COLUMNS.index("prompt"), "prompt", table.column("prompt").to_pylist())
    return df


def split_pairs(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation): a seeded shuffle with round(len * val_fraction) rows held out, at least 1 in each."""
    if not 0 < val_fraction < 1:
        raise SarmError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    if len(df) < 2:
        raise SarmError(f"cannot split {len(df)} pair(s) into training and validation sets")
    n_val = min(max(round(len(df) * val_fraction), 1), len(df) - 1)
    order = np.random.default_rng(seed).permutation(len(df))
    val = df.iloc[order[:n_val]].reset_index(drop=True)
    train = df.iloc[order[n_val:]].reset_index(drop=True)
    return train, val


def load_texts(spec: dict, mirror: str | None = None) -> pd.DataFrame:
    """A plain-text corpus (config key sae.corpus) as a table (id, text): a local file or a hub data set,
    streamed from the hub or mirror so that only the first `max_documents` documents are read."""
    field, limit = spec.get("field", "text"), spec.get("max_documents")
    if "path" in spec:
        source, rows = str(spec["path"]), _iter_records(spec["path"])
    elif "hub" in spec:
        source, rows = (
            spec["hub"],
            _stream_hub_records(spec["hub"], spec.get("split", "train"), spec.get("config_name"), mirror, spec.get("revision")),
        )
    else:
        raise SarmError("config key sae.corpus: give path or hub")
    texts = []
    for number, row in enumerate(rows):
        if field not in row:
            raise SarmError(
                f"config key sae.corpus.field: row {number} of {source} has no field {field!r} (it has {sorted(row)})"
            )
        if isinstance(row[field], str) and row[field].strip():
            texts.append(row[field])
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise SarmError(f"config key sae.corpus: {source} holds no non-empty {field!r} text")
    return pd.DataFrame({"id": np.arange(len(texts)), "text": texts})


def _iter_records(path: str | os.PathLike):
    """Rows of a large local file one at a time: `.jsonl` (optionally `.gz`) line by line, `.parquet` batch by
    batch; other files (small `.json`) through `read_records`."""
    path = Path(path)
    if not path.is_file():
        raise SarmError(f"{path}: no such file")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".jsonl"):
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SarmError(f"{path}: line {number + 1} is not JSON ({e.msg})") from None
    elif name.endswith(".parquet") and not path.name.lower().endswith(".gz"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        yield from read_records(path)


def _stream_hub_records(hub_id: str, split: str, config_name: str | None, mirror: str | None, revision: str | None):
    """Rows of a hub data set one at a time (datasets' streaming mode), from `mirror/hub_id` when it exists."""
    import datasets

    local = Path(mirror) / hub_id if mirror else None
    source = str(local) if local is not None and local.is_dir() else hub_id
    try:
        yield from datasets.load_dataset(
            source, name=config_name, split=split, streaming=True, **({} if source != hub_id else {"revision": revision})
        )
    except (OSError, ValueError, FileNotFoundError) as e:
        tried = f"the mirror {local}" if source != hub_id else f"the hub (mirror: {local or 'none configured'})"
        raise SarmError(f"corpus {hub_id}: cannot read it from {tried} ({_one_line(e)})") from None
