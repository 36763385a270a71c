"""Cache the truncated LM's hidden states: final-token reward features and the sentence-final SAE corpus.

Each (prompt, response) is rendered with the model's chat template, the trailing whitespace dropped so the
last token is the end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...), and left-truncated to `max_length`.
Sequences run through layers 1..L in length-sorted batches, the sequences of one prompt (a pair's two responses,
a prompt's best-of-N candidates) in one packed row that computes the prompt once; each hidden vector kept is
standardised per token, (h - mean) / (std + eps), and streamed to safetensors shards, so memory stays flat as
data grows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sarm.errors import SarmError
from sarm.provenance import CACHE_FORMAT, CACHE_META_FILE

log = logging.getLogger(__name__)

SENTENCE_END_CHARS = frozenset(".,?!;\n")
STANDARDIZE_EPS = 1e-6
INDEX_FILE = "index.parquet"
META_FILE = CACHE_META_FILE
CHECKSUMS = "shard_sha256"  # meta.json key: shard file name -> sha256 of its bytes, checked when it is read


@dataclass
class Encoded:
    """One tokenised conversation: its ids, the positions of sentence-final content tokens, and whether
    it was cut to fit `max_length`. `content`: the positions of the tokens inside message content (None: not
    known, e.g. a conversation rendered elsewhere); `unlocated`: how many messages' content could not be found
    in the rendered text (their tokens count as template, so they give no sentence ends)."""

    input_ids: np.ndarray
    sentence_ends: np.ndarray
    truncated: bool
    response_start: int = 0  # the first token of the last message's content (the joint mode's reconstruction span)
    content: np.ndarray | None = None
    unlocated: int = 0


def render(tokenizer, prompt: list[dict], response: str) -> str:
    messages = list(prompt) + [{"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False).rstrip()


_SLOT = "\ue000{}\ue001"  # private-use characters: a message's place in a template rendered without its content


def _template_spans(tokenizer, prompt: list[dict], response: str, text: str) -> list[tuple[int, int]] | None:
    """Character spans of each message's content in `text` (the rendered conversation), read off the same
    template rendered with a placeholder for each content: the template's own text lies between the
    placeholders, so a content that repeats template text (its markup, a role name) is never mistaken for it.
    None when the template changes contents in a way other than trimming them."""
    contents = [m["content"] for m in prompt] + [response]
    slots = [{**m, "content": _SLOT.format(i)} for i, m in enumerate(prompt)]
    try:
        skeleton = render(tokenizer, slots, _SLOT.format(len(prompt)))
    except Exception:  # a template that inspects contents: fall back to searching for them
        return None
    pieces, cursor = [], 0
    for i in range(len(contents)):
        start = skeleton.find(_SLOT.format(i), cursor)
        if start < 0:
            return None
        pieces.append(skeleton[cursor:start])
        cursor = start + len(_SLOT.format(i))
    pieces.append(skeleton[cursor:])
    spans, at = [], 0
    for i, content in enumerate(contents):
        if not text.startswith(pieces[i], at):
            return None
        at += len(pieces[i])
        # the content as the template shows it: as given, or trimmed (e.g. Llama 3's `| trim`)
        shown = next(
            (
                c
                for c in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip()))
                if text.startswith(c + pieces[i + 1], at)
            ),
            None,
        )
        if shown is None:
            return None
        spans.append((at, at + len(shown)))
        at += len(shown)
    return spans if at + len(pieces[-1]) == len(text) else None


def _content_spans(text: str, contents: list[str]) -> list[tuple[int, int]]:
    """Character spans of each message's content inside the rendered text, found left to right, as given or
    trimmed as a template may show it (Llama 3's `| trim`). A content not found has no span."""
    spans, cursor = [], 0
    for content in contents:
        for shown in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            start = text.find(shown, cursor) if shown else -1
            if start >= 0:
                spans.append((start, start + len(shown)))
                cursor = start + len(shown)
                break
    return spans


def sentence_final_positions(text: str, offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token positions that close a sentence: the last token of a run of `. , ? ! ; \\n` inside message
    content (template scaffolding and special tokens never count)."""

    def in_content(start: int, end: int) -> bool:
        return end > start and any(s <= start and end <= e for s, e in spans)

    def ends_with_mark(i: int) -> bool:
        piece = text[offsets[i][0] : offsets[i][1]].rstrip(" \t")
        return bool(piece) and piece[-1] in SENTENCE_END_CHARS

    def starts_with_mark(i: int) -> bool:
        piece = text[offsets[i][0] : offsets[i][1]].lstrip(" \t")
        return bool(piece) and piece[0] in SENTENCE_END_CHARS

    positions = []
    for i, (start, end) in enumerate(offsets):
        if not in_content(start, end) or not ends_with_mark(i):
            continue
        following = i + 1 < len(offsets) and in_content(*offsets[i + 1]) and starts_with_mark(i + 1)
        if not following:
            positions.append(i)
    return positions


def content_positions(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """Positions of the tokens that lie inside message content (`sentence_final_positions`' sense): never a BOS,
    a special token of the template or its scaffolding text."""
    return np.asarray(
        [i for i, (start, end) in enumerate(offsets) if end > start and any(a <= start and end <= b for a, b in spans)],
        dtype=np.int64,
    )


_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def special_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special added tokens (`<|im_end|>`, `<|eot_id|>`, ...), the ones text can forge."""
    try:
        return _SPECIAL_IDS[tokenizer]
    except (KeyError, TypeError):
        ids = frozenset(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
        try:
            _SPECIAL_IDS[tokenizer] = ids
        except TypeError:  # a tokenizer that cannot be weakly referenced: computed each time
            pass
        return ids


def _markup_as_text(tokenizer, text: str, ids: list[int], offsets: list, template_token) -> tuple[list[int], list]:
    """Token ids and offsets of `text` with only the template's own special tokens special: each stretch between
    two of them is tokenised with `split_special_tokens`, so that markup typed in a message stays text. (A
    tokenizer cuts its input at special tokens before anything else, so a stretch without typed markup
    tokenises as it does in the whole text.)"""
    out_ids, out_offsets, start = [], [], 0

    def stretch(a: int, b: int) -> None:
        if a < b:
            piece = tokenizer(text[a:b], add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            out_ids.extend(piece["input_ids"])
            out_offsets.extend((s + a, e + a) for s, e in piece["offset_mapping"])

    for token, (s, e) in zip(ids, offsets):
        if template_token(token, s, e):
            stretch(start, s)
            out_ids.append(token)
            out_offsets.append((s, e))
            start = e
    stretch(start, len(text))
    return out_ids, out_offsets


def encode(tokenizer, prompt: list[dict], response: str, max_length: int) -> Encoded:
    """Token ids of (prompt, response) rendered with the chat template. The contents are untrusted text: chat
    markup typed in one (`<|im_end|>\n<|im_start|>assistant\n...`) is tokenised as the characters it is, never
    as the special tokens that would open a new turn; the template's own markup stays special. A conversation
    without such markup tokenises exactly as the whole rendered text does."""
    text = render(tokenizer, prompt, response)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    contents = [m["content"] for m in prompt] + [response]
    spans = _template_spans(tokenizer, prompt, response, text) or _content_spans(text, contents)
    special = special_ids(tokenizer)

    def in_content(start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in spans)

    if any(token in special and in_content(s, e) for token, (s, e) in zip(ids, offsets)):
        ids, offsets = _markup_as_text(tokenizer, text, ids, offsets, lambda t, s, e: t in special and not in_content(s, e))
    ends = np.asarray(sentence_final_positions(text, offsets, spans), dtype=np.int64)
    inside = content_positions(offsets, spans)
    # a message the template rewrites beyond trimming is not found: counted (cache meta), not silently dropped
    unlocated = max(0, sum(1 for c in contents if c.strip()) - sum(1 for a, b in spans if b > a))
    cut = max(0, len(ids) - max_length)  # keep the end: the reward is read at the final token
    return Encoded(
        np.asarray(ids[cut:], dtype=np.int64),
        ends[ends >= cut] - cut,
        cut > 0,
        max(0, _response_start(text, offsets, spans, response) - cut),
        inside[inside >= cut] - cut,
        unlocated,
    )


def _response_start(text: str, offsets: list, spans: list[tuple[int, int]], response: str) -> int:
    """The first token of the response's content (the last span, when it shows the response as given or trimmed);
    the final token when the response could not be located."""
    if spans and response.strip() and text[spans[-1][0] : spans[-1][1]].strip() == response.strip():
        start = spans[-1][0]
        return next((i for i, (_, end) in enumerate(offsets) if end > start), len(offsets) - 1)
    return len(offsets) - 1


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    """A conversation already rendered with the chat template, tokenised as `encode` tokenises the text it
    renders (no chat template applied here, no special tokens added; no sentence positions)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = max(0, len(ids) - max_length)
    return Encoded(np.asarray(ids[cut:], dtype=np.int64), np.zeros(0, dtype=np.int64), cut > 0)


def text_windows(tokenizer, text: str, max_length: int) -> list[Encoded]:
    """A plain document (no chat template; the tokenizer's own special tokens) cut into windows of at most
    `max_length` tokens, each with the positions of its sentence-final tokens: the paper's SAE corpus shape."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    ends = np.asarray(sentence_final_positions(text, offsets, [(0, len(text))]), dtype=np.int64)
    text_tokens = content_positions(offsets, [(0, len(text))])  # all but the tokenizer's BOS / EOS
    windows = []
    for start in range(0, len(ids), max_length):
        stop = min(start + max_length, len(ids))
        inside = ends[(ends >= start) & (ends < stop)] - start
        content = text_tokens[(text_tokens >= start) & (text_tokens < stop)] - start
        windows.append(Encoded(np.asarray(ids[start:stop], dtype=np.int64), inside, False, content=content))
    return windows


def cache_texts(
    model,
    tokenizer,
    texts: pd.DataFrame,
    out_dir: str | Path,
    max_length: int,
    batch_size: int,
    device: str = "cpu",
    meta: dict | None = None,
    corpus: str = "sentence",
    max_tokens: int | None = None,
) -> dict:
    """Cache a plain-text SAE corpus (columns id, text): the sentence-final (or, `corpus="token"`, uniformly
    drawn) states of every window of the documents, in order, until `max_tokens` tokens (the token budget;
    None: all documents)."""
    encoded, rows, n_tokens, n_documents = [], [], 0, 0
    for doc in tqdm(texts.itertuples(index=False), total=len(texts), desc="tokenise", mininterval=5):
        if max_tokens is not None and n_tokens >= max_tokens:
            break
        n_documents += 1
        for number, window in enumerate(text_windows(tokenizer, doc.text, max_length)):
            rows.append({"seq": len(rows), "id": doc.id, "window": number})
            encoded.append(window)
            n_tokens += len(window.input_ids)
    if max_tokens is not None and n_tokens < max_tokens:
        log.warning(
            "the SAE corpus holds %d tokens in %d documents, fewer than its budget sae.corpus.max_tokens = %d: "
            "raise sae.corpus.max_documents to reach it",
            n_tokens,
            n_documents,
            max_tokens,
        )
    return cache_sequences(
        model,
        tokenizer,
        pd.DataFrame(rows),
        out_dir,
        max_length,
        batch_size,
        device,
        meta={**(meta or {}), "corpus": corpus, "source": "text"},
        counts={"n_documents": n_documents, "n_documents_fetched": len(texts), "max_tokens": max_tokens},
        corpus=corpus,
        encoded=encoded,
    )


def token_positions(encoded: Encoded, seed: int) -> Encoded:
    """The same sequence with its sentence-final positions replaced by as many (at least one) positions drawn
    uniformly from its content tokens (`Encoded.content`; all its tokens where that is unknown), without
    replacement: the token-level SAE's corpus at the same size. Like the sentence-level corpus it never holds a
    BOS or a chat-template token."""
    pool = np.arange(len(encoded.input_ids)) if encoded.content is None else np.asarray(encoded.content)
    count = min(len(pool), max(1, len(encoded.sentence_ends)))
    picked = np.sort(np.random.default_rng(seed).choice(pool, size=count, replace=False))
    return replace(encoded, sentence_ends=picked.astype(np.int64))


def standardize(hidden: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Per-token standardisation over the hidden dimension, in float32."""
    hidden = hidden.float()
    return (hidden - hidden.mean(-1, keepdim=True)) / (hidden.std(-1, keepdim=True) + eps)


def prompt_position(encoded: Encoded) -> int:
    """Where a sequence's prompt state is read: the last token before the response's content (the end of the
    assistant header), or the final token when the response was not located (`response_start` 0)."""
    return encoded.response_start - 1 if encoded.response_start > 0 else len(encoded.input_ids) - 1


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices of similar length (longest first, so an out-of-memory shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def pad_right(sequences: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences as one right-padded batch: (input_ids, attention_mask), both [B, longest]."""
    ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def forward_batch(model, batch: list[Encoded], pad_id: int, device: str, with_sentences: bool, standardized: bool = True):
    """Run one right-padded batch; return standardised final-token vectors [B, d], per sequence its standardised
    sentence-final vectors [m_i, d], and the standardised prompt states [B, d] (at `prompt_position`).
    `standardized=False`: the raw states, in float32 (what a public SAE reads; sae-lens normalises them itself)."""
    states = standardize if standardized else (lambda h: h.float())
    lengths = [len(e.input_ids) for e in batch]
    ids, mask = pad_right([e.input_ids for e in batch], pad_id)
    hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    rows = torch.arange(len(batch), device=hidden.device)
    final = states(hidden[rows, torch.tensor(lengths, device=hidden.device) - 1]).cpu()
    prompt = states(hidden[rows, torch.tensor([prompt_position(e) for e in batch], device=hidden.device)]).cpu()
    sentences = []
    if with_sentences:
        for row, e in enumerate(batch):
            pos = torch.from_numpy(e.sentence_ends).to(hidden.device)
            sentences.append(states(hidden[row, pos]).cpu())
    return final, sentences, prompt


# --- shared prompts, computed once -----------------------------------------------------------------------
MIN_SHARED_PREFIX = 16  # tokens: a shorter common prefix is not worth a packed row
PACKABLE_ATTENTION = ("sdpa", "eager")  # implementations that read a custom 4D mask as given


@dataclass
class PackedRow:
    """One row of a packed forward: the `prefix` tokens its `members` (sequence indices) share, once, then each
    member's own tokens after it. A member attends to the prefix and to itself, at its own positions, so its
    states are the ones a forward of that sequence alone gives."""

    prefix: int
    members: list[int]


def shared_prefix(ids: list[np.ndarray]) -> int:
    """The length of the sequences' longest common prefix, leaving each at least its own last token."""
    n = min(len(x) for x in ids) - 1
    for other in ids[1:]:
        differ = np.flatnonzero(ids[0][:n] != other[:n])
        n = int(differ[0]) if len(differ) else n
    return max(n, 0)


def packed_rows(encoded: list[Encoded], groups: list, max_row_tokens: int) -> list[PackedRow]:
    """Sequences with the same `groups` label (e.g. the two responses of a pair, a prompt's best-of-N candidates;
    None: alone) share their common token prefix in one row, as many per row as `max_row_tokens` holds."""
    by_group: dict = {}
    for i, label in enumerate(groups):
        by_group.setdefault(i if label is None else ("group", label), []).append(i)
    rows = []
    for members in by_group.values():
        prefix = shared_prefix([encoded[i].input_ids for i in members]) if len(members) > 1 else 0
        if prefix < MIN_SHARED_PREFIX:
            rows.extend(PackedRow(0, [i]) for i in members)
            continue
        row, length = PackedRow(prefix, []), prefix
        for i in members:
            own = len(encoded[i].input_ids) - prefix
            if row.members and length + own > max_row_tokens:
                rows.append(row)
                row, length = PackedRow(prefix, []), prefix
            row.members.append(i)
            length += own
        rows.append(row)
    return rows


def row_length(row: PackedRow, encoded: list[Encoded]) -> int:
    return row.prefix + sum(len(encoded[i].input_ids) - row.prefix for i in row.members)


def packed_batches(rows: list[PackedRow], encoded: list[Encoded], batch_size: int) -> list[list[PackedRow]]:
    """Rows of similar length (longest first), at most `batch_size` sequences a batch (a row that holds more is a
    batch of its own)."""
    order = sorted(rows, key=lambda row: -row_length(row, encoded))
    batches, batch, size = [], [], 0
    for row in order:
        if batch and size + len(row.members) > batch_size:
            batches.append(batch)
            batch, size = [], 0
        batch.append(row)
        size += len(row.members)
    return batches + [batch] if batch else batches


@torch.no_grad()
def forward_packed(
    model,
    rows: list[PackedRow],
    encoded: list[Encoded],
    pad_id: int,
    device: str,
    with_sentences: bool,
    standardized: bool = True,
):
    """`forward_batch` over packed rows: (members in row order, final vectors [n, d], sentence vectors per member,
    prompt states [n, d]; a prompt state inside the shared prefix is read at the prefix's column)."""
    states = standardize if standardized else (lambda h: h.float())
    width = max(row_length(row, encoded) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segment = torch.full_like(ids, -1)  # -1 padding, 0 the shared prefix, j + 1 member j's own tokens
    where: dict[int, tuple[int, int, int]] = {}  # member -> (row, its first own token's column, the prefix)
    last: dict[int, int] = {}  # member -> the column of its last token (its own: shared_prefix leaves it one)
    for r, row in enumerate(rows):
        p = row.prefix
        ids[r, :p] = torch.from_numpy(encoded[row.members[0]].input_ids[:p])
        positions[r, :p] = torch.arange(p)
        segment[r, :p] = 0
        at = p
        for j, i in enumerate(row.members):
            own = encoded[i].input_ids[p:]
            ids[r, at : at + len(own)] = torch.from_numpy(own)
            positions[r, at : at + len(own)] = torch.arange(p, p + len(own))
            segment[r, at : at + len(own)] = j + 1
            where[i] = (r, at, p)
            last[i] = at + len(own) - 1
            at += len(own)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & ((key == 0) | (key == query))  # a padding token (-1) attends to itself and the prefix: no NaN
    mask = allowed[:, None]
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=model.dtype).masked_fill(~mask, torch.finfo(model.dtype).min)
    hidden = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=False
    ).last_hidden_state

    def column(i: int, token: np.ndarray) -> np.ndarray:
        r, at, p = where[i]
        return np.where(token < p, token, at + token - p)

    members = [i for row in rows for i in row.members]
    rows_of = torch.tensor([where[i][0] for i in members], device=hidden.device)
    final = states(hidden[rows_of, torch.tensor([last[i] for i in members], device=hidden.device)]).cpu()
    prompt_cols = [int(column(i, np.asarray(prompt_position(encoded[i])))) for i in members]
    prompt = states(hidden[rows_of, torch.tensor(prompt_cols, device=hidden.device)]).cpu()
    sentences = []
    if with_sentences:
        for i in members:
            cols = torch.from_numpy(column(i, encoded[i].sentence_ends).astype(np.int64)).to(hidden.device)
            sentences.append(states(hidden[where[i][0], cols]).cpu())
    return members, final, sentences, prompt


def packing_agrees(
    model, rows: list[PackedRow], encoded: list[Encoded], pad_id: int, device: str, standardized: bool = True
) -> bool:
    """Whether this float32 model gives packed rows the states it gives the sequences alone, at every final token,
    to 1e-3 (SmolLM2-135M: 3e-6; with its positions ignored, 0.6): a forward that ignores `position_ids` or a
    custom 4D mask fails."""
    members, packed, _, _ = forward_packed(model, rows, encoded, pad_id, device, False, standardized)
    plain, _, _ = forward_batch(model, [encoded[i] for i in members], pad_id, device, False, standardized)
    return bool((packed - plain).abs().max() <= 1e-3)


def pair_sequences(pairs: pd.DataFrame) -> pd.DataFrame:
    """Two sequences per pair: sequence 2i is pair i's chosen response, 2i+1 its rejected one (with the pair's
    `category`, when the table has one: what a multi-objective head groups its training pairs by)."""
    rows = []
    for i, pair in enumerate(pairs.itertuples(index=False)):
        label = {"category": pair.category} if "category" in pairs.columns else {}
        for seq, side, response in ((2 * i, "chosen", pair.chosen), (2 * i + 1, "rejected", pair.rejected)):
            rows.append(
                {"seq": seq, "pair": i, "id": pair.id, "side": side, **label, "prompt": pair.prompt, "response": response}
            )
    return pd.DataFrame(rows)


class ShardWriter:
    """Buffers vectors and writes a safetensors shard every `shard_size` sequences (tmp file, then rename)."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.n_shards = 0
        self.checksums: dict[str, str] = {}
        self._clear()

    def _clear(self):
        self.seq, self.final, self.prompt, self.sent, self.sent_seq = [], [], [], [], []

    def add(self, seq: list[int], final: torch.Tensor, sentences: list[torch.Tensor], prompt: torch.Tensor):
        self.seq.extend(seq)
        self.final.append(final)
        self.prompt.append(prompt)
        for s, vectors in zip(seq, sentences):
            self.sent.append(vectors.half())
            self.sent_seq.append(torch.full((len(vectors),), s, dtype=torch.long))
        if len(self.seq) >= self.shard_size:
            self.flush()

    def flush(self):
        if not self.seq:
            return
        tensors = {
            "seq": torch.tensor(self.seq, dtype=torch.long),
            "final": torch.cat(self.final),
            "prompt": torch.cat(self.prompt),
        }
        if self.sent:
            tensors["sent"] = torch.cat(self.sent)
            tensors["sent_seq"] = torch.cat(self.sent_seq)
        path = self.out_dir / f"shard_{self.n_shards:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp)
        self.checksums[path.name] = _sha256(tmp.read_bytes())
        os.replace(tmp, path)
        self.n_shards += 1
        self._clear()


def cache_activations(
    model,
    tokenizer,
    pairs: pd.DataFrame,
    out_dir: str | Path,
    max_length: int,
    batch_size: int,
    device: str = "cpu",
    shard_size: int = 1024,
    with_sentences: bool = True,
    meta: dict | None = None,
    corpus: str = "sentence",
) -> dict:
    """Cache the standardised hidden states of every chosen and rejected sequence of `pairs`."""
    return cache_sequences(
        model,
        tokenizer,
        pair_sequences(pairs),
        out_dir,
        max_length,
        batch_size,
        device,
        shard_size,
        with_sentences,
        {**(meta or {}), "corpus": corpus},
        counts={"n_pairs": len(pairs)},
        corpus=corpus,
    )


def cache_sequences(
    model,
    tokenizer,
    sequences: pd.DataFrame,
    out_dir: str | Path,
    max_length: int,
    batch_size: int,
    device: str = "cpu",
    shard_size: int = 1024,
    with_sentences: bool = True,
    meta: dict | None = None,
    counts: dict | None = None,
    corpus: str = "sentence",
    encoded: list[Encoded] | None = None,
) -> dict:
    """Cache the standardised hidden states of any list of (prompt, response): one row of `sequences` each,
    with columns `prompt` (chat messages) and `response`; row i becomes cached sequence i, and the other
    columns go to the index as they are. The SAE corpus kept beside the final tokens holds the sentence-final
    states (`corpus="sentence"`) or as many states at token positions drawn uniformly (`"token"`, for the
    token-level SAE ablation). `encoded`: sequences tokenised already (then `sequences` is only the index, and
    no prompt is known to be shared: each sequence runs whole, unpacked).
    A pretrained SAE's input in `meta["sae_input"]` (sarm.sae_input: its hook and normalisation) is checked against
    the model, and says whether the states are standardised (this project's SAEs) or kept raw (a public SAE's)."""
    states = (meta or {}).get("sae_input")
    if states is not None:
        _check_states(model, states)
    standardized = states is None or states["standardize"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sequences = sequences.reset_index(drop=True)
    groups = [None] * len(sequences)  # sequences of one prompt share its tokens in a packed row
    if encoded is None:
        encoded = [
            encode(tokenizer, row.prompt, row.response, max_length)
            for row in tqdm(sequences.itertuples(index=False), total=len(sequences), desc="tokenise", mininterval=5)
        ]
        groups = [json.dumps(prompt, sort_keys=True) for prompt in sequences["prompt"]]
        sequences = sequences.drop(columns=["prompt", "response"])
    n_unlocated = sum(e.unlocated for e in encoded)
    if n_unlocated:
        log.warning(
            "%d message(s) could not be located in their chat-templated text (the template rewrites them "
            "beyond trimming): they give no sentence ends",
            n_unlocated,
        )
    if corpus == "token":
        encoded = [token_positions(e, seed=i) for i, e in enumerate(encoded)]
    elif corpus != "sentence":
        raise SarmError(f"unknown SAE corpus {corpus!r} (sentence or token)")
    sequences = sequences.assign(
        n_tokens=[len(e.input_ids) for e in encoded],
        n_response_tokens=[len(e.input_ids) - e.response_start for e in encoded],  # from its first content token
        n_sentences=[len(e.sentence_ends) for e in encoded],
        truncated=[e.truncated for e in encoded],
    )
    writer = ShardWriter(out_dir, shard_size)
    start = time.perf_counter()
    rows, packed = _rows(model, encoded, groups, max_length, batch_size, tokenizer.pad_token_id, device, standardized)

    def run(batch: list[PackedRow]):
        if packed:
            return forward_packed(model, batch, encoded, tokenizer.pad_token_id, device, with_sentences, standardized)
        members = [i for row in batch for i in row.members]
        return members, *forward_batch(
            model, [encoded[i] for i in members], tokenizer.pad_token_id, device, with_sentences, standardized
        )

    batches = packed_batches(rows, encoded, batch_size)
    with cpu_workers(device) as pool:
        for members, final, sentences, prompt in tqdm(
            pool.map(run, batches), total=len(batches), desc=f"layers 1..L -> {out_dir.name}", mininterval=5
        ):
            bad = [i for i, row in zip(members, final) if not torch.isfinite(row).all()]
            if bad:
                raise SarmError(
                    f"{out_dir}: the model gave non-finite hidden states for {len(bad)} sequence(s) (e.g. "
                    f"sequence {bad[0]}); a float16 overflow? try config key model.dtype: float32"
                )
            writer.add(members, final, sentences, prompt)
    writer.flush()
    seconds = time.perf_counter() - start
    sequences.to_parquet(out_dir / INDEX_FILE, index=False)
    n_trunc = int(sequences["truncated"].sum())
    if n_trunc:
        log.warning("%d of %d sequences were longer than max_length=%d and lost their start", n_trunc, len(sequences), max_length)
    info = {
        **(meta or {}),
        "cache_format": CACHE_FORMAT,
        "hidden_size": model.config.hidden_size,
        **(counts or {}),
        "n_sequences": len(sequences),
        "n_tokens": int(sequences["n_tokens"].sum()),
        "n_sentence_vectors": int(sequences["n_sentences"].sum()) if with_sentences else 0,
        "n_truncated": n_trunc,
        "n_unlocated_messages": n_unlocated,
        "max_length": max_length,
        "n_shards": writer.n_shards,
        "shared_prompts_packed": packed,
        "n_tokens_forwarded": sum(row_length(row, encoded) for row in rows),
        CHECKSUMS: writer.checksums,
        "forward_seconds": round(seconds, 3),
        "sequences_per_second": round(len(sequences) / max(seconds, 1e-9), 3),
        "tokens_per_second": round(int(sequences["n_tokens"].sum()) / max(seconds, 1e-9), 1),
        "standardize_eps": STANDARDIZE_EPS if standardized else None,  # None: raw states (meta sae_input)
    }
    (out_dir / META_FILE).write_text(json.dumps(info, indent=2))
    return info


@contextmanager
def cpu_workers(device: str):
    """On the CPU, one worker thread per torch thread, each running its batches on one thread: two batches side
    by side on two cores beat one batch on both (SmolLM2-135M: +6 to 13 % tokens/s; a row's states are computed the
    same way either way, bit for bit). Elsewhere, the batches in order."""
    workers = torch.get_num_threads() if device == "cpu" else 1
    if workers < 2:
        yield SimpleNamespace(map=map)
        return
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))  # OpenMP's count is per thread
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)  # a failed batch stops the rest
        torch.set_num_threads(workers)  # MKL's count is global: restored for what this process does next


def _rows(model, encoded, groups, max_length, batch_size, pad_id, device, standardized) -> tuple[list[PackedRow], bool]:
    """The forward's rows, and whether they are packed: shared prompts are computed once in float32 (in 16 bits a
    packed row rounds differently from the sequence alone, by as much as bf16 rounds: the cache would no longer
    give the scores a model gives the text), where the model's attention reads a custom mask and a first packed
    batch gives the states the sequences alone give."""
    alone = [PackedRow(0, [i]) for i in range(len(encoded))]
    if model.dtype != torch.float32:
        return alone, False
    rows = packed_rows(encoded, groups, 2 * max_length)
    shared = [row for row in rows if row.prefix]
    if not shared:
        return alone, False
    attention = model.config._attn_implementation
    # the check runs one batch as the loop will (a best-of-N row can hold many more sequences than batch_size)
    if attention in PACKABLE_ATTENTION and packing_agrees(
        model, packed_batches(shared, encoded, batch_size)[0], encoded, pad_id, device, standardized
    ):
        return rows, True
    log.warning("attention %r: shared prompts are not packed (each sequence runs whole)", attention)
    return alone, False


def _check_states(model, states: dict) -> None:
    """The truncated model gives the hidden state the SAE's hook names, as wide as the SAE reads."""
    from sarm.sae_input import check_width

    layer = model.config.num_hidden_layers  # the truncated model's last_hidden_state is hidden_states[layer]
    if states["hidden_states"] != layer:
        raise SarmError(
            f"config key sae.pretrained: the SAE's hook {states['hook_name']} reads hidden_states"
            f"[{states['hidden_states']}], but config key model.layer = {layer} caches hidden_states[{layer}]"
        )
    check_width(states, model.config.hidden_size, layer)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ActivationCache:
    """Read side of a cached activation folder. Every shard is checked against the sha256 its writer recorded
    in meta.json as it is read (the bytes are hashed once, as they are loaded), and against non-finite values:
    a corrupted cache stops the run naming the file, never gives scores."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / META_FILE).exists():
            raise SarmError(f"{self.folder} is not a finished activation cache (no {META_FILE}); re-run its rule")
        try:
            self.meta = json.loads((self.folder / META_FILE).read_text())
            self.index = pd.read_parquet(self.folder / INDEX_FILE)
        except (OSError, ValueError) as err:  # a truncated meta.json or index, or no index at all
            raise SarmError(f"{self.folder}: unreadable cache ({type(err).__name__}); re-run its rule") from None
        self.shards = sorted(self.folder.glob("shard_*.safetensors"))
        if len(self.shards) != self.meta["n_shards"]:
            raise SarmError(f"{self.folder}: {len(self.shards)} shards found, {self.meta['n_shards']} written; re-run its rule")
        self.checksums = self.meta.get(CHECKSUMS)  # None: a cache written before checksums were recorded
        if self.checksums is None:
            log.warning(
                "%s records no shard checksums (written by an older version): corruption cannot be detected; "
                "re-run its rule to add them",
                self.folder,
            )

    @property
    def hidden_size(self) -> int:
        return self.meta["hidden_size"]

    def load_shard(self, shard: Path) -> dict[str, torch.Tensor]:
        """The tensors of one shard, after checking its bytes against the recorded sha256."""
        try:
            data = shard.read_bytes()
        except OSError as err:
            raise SarmError(
                f"{shard}: unreadable activation shard ({err.strerror}); re-run the rule that cached {self.folder}"
            ) from None
        if self.checksums is not None and self.checksums.get(shard.name) != _sha256(data):
            raise SarmError(
                f"{shard}: corrupted activation shard (its sha256 differs from the one recorded in "
                f"{META_FILE}); delete {self.folder} and re-run the rule that cached it"
            )
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError) as err:
            raise SarmError(
                f"{shard}: corrupt or truncated safetensors ({err}); delete {self.folder} and re-run the rule that cached it"
            ) from None
        for name in ("final", "prompt", "sent"):
            if name in tensors and not torch.isfinite(tensors[name]).all():
                raise SarmError(
                    f"{shard}: non-finite values in {name!r}; delete {self.folder} and re-run the rule that cached it"
                )
        return tensors

    def final(self) -> torch.Tensor:
        """Final-token vectors of all sequences, row = sequence number (chosen 2i, rejected 2i+1)."""
        return self.states("final")[0]

    def prompt_final(self) -> torch.Tensor:
        """Each sequence's prompt state (`prompt_position`: the last token before its response), row = sequence."""
        return self.states("prompt")[0]

    def states(self, *names: str) -> tuple[torch.Tensor, ...]:
        """The per-sequence states `names` ("final", "prompt"), row = sequence, read in one pass over the shards."""
        out = [torch.full((len(self.index), self.hidden_size), float("nan")) for _ in names]
        for shard in self.shards:
            tensors = self.load_shard(shard)
            for name, states in zip(names, out):
                if name not in tensors:
                    raise SarmError(
                        f"{self.folder}: cached before its shards kept {name!r} states (cache format < {CACHE_FORMAT}); "
                        "re-run the rule that cached it"
                    )
                states[tensors["seq"]] = tensors[name]
        for states in out:
            missing = torch.isnan(states).any(1).nonzero().flatten()
            if len(missing):
                raise SarmError(
                    f"{self.folder}: {len(missing)} of {len(states)} sequences have no cached vector (the first: "
                    f"{int(missing[0])}); delete it and re-run the rule that cached it"
                )
        return tuple(out)

    def sentence_shards(self) -> Iterator[torch.Tensor]:
        """Sentence-final vectors, one shard at a time (float32)."""
        for shard in self.shards:
            tensors = self.load_shard(shard)
            if "sent" in tensors:
                yield tensors["sent"].float()
