"""The plain-text SAE corpus (config key sae.corpus; the paper's OpenWebText2): reading, windows, caching."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from sarm import activations, models
from sarm.data import load_texts
from sarm.errors import SarmError

DOCS = [
    "The cat sat on the mat. It was warm, and the sun was out!\nThen it left; nobody saw where.",
    "",
    "Short one without an end mark",
    "A second document. With two sentences.",
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_texts_skips_empty_documents_and_stops_at_max_documents(tmp_path):
    path = _jsonl(tmp_path / "owt.jsonl", [{"text": d, "meta": i} for i, d in enumerate(DOCS)])
    texts = load_texts({"path": str(path)})
    assert texts["text"].tolist() == [DOCS[0], DOCS[2], DOCS[3]] and texts["id"].tolist() == [0, 1, 2]
    assert len(load_texts({"path": str(path), "max_documents": 2})) == 2


def test_load_texts_streams_a_mirror_folder_laid_out_like_the_hub(tmp_path, offline):
    folder = tmp_path / "mirror" / "segyges" / "OpenWebText2" / "data"
    folder.mkdir(parents=True)
    pd.DataFrame({"text": DOCS[:1] + DOCS[3:] * 5}).to_parquet(folder / "train-00000-of-00001.parquet")
    texts = load_texts({"hub": "segyges/OpenWebText2", "split": "train", "max_documents": 3}, mirror=str(tmp_path / "mirror"))
    assert texts["text"].tolist() == [DOCS[0], DOCS[3], DOCS[3]]


def test_a_corpus_row_without_the_field_names_the_key_and_the_row(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "ok."}, {"body": "no text field"}])
    with pytest.raises(SarmError, match=r"sae.corpus.field: row 1 of .*c.jsonl has no field 'text' \(it has \['body'\]\)"):
        load_texts({"path": str(path)})


def test_text_windows_cut_documents_and_keep_sentence_ends(tiny_model_dir):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    whole = activations.text_windows(tokenizer, DOCS[0], 10_000)
    assert len(whole) == 1
    ids = whole[0].input_ids
    ends = [tokenizer.decode(ids[p]).rstrip(" ") for p in whole[0].sentence_ends]
    # "mat." "warm," the run "!\n" (its last token) "left;" "where."
    assert len(ends) == 5 and all(e and e[-1] in ".,!;\n" for e in ends), ends
    cut = activations.text_windows(tokenizer, DOCS[0], 8)
    assert [len(w.input_ids) for w in cut[:-1]] == [8] * (len(cut) - 1)
    assert sum(len(w.input_ids) for w in cut) == len(ids)
    # the same sentence ends, window by window
    assert sorted(8 * i + p for i, w in enumerate(cut) for p in w.sentence_ends) == whole[0].sentence_ends.tolist()


def test_cache_texts_writes_a_corpus_the_sae_reads(tiny_model_dir, tmp_path):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    backbone = models.load_truncated(tiny_model_dir, 2, torch.float32)
    texts = pd.DataFrame({"id": [0, 1], "text": [DOCS[0], DOCS[3]]})
    info = activations.cache_texts(backbone, tokenizer, texts, tmp_path / "corpus", 16, 4, meta={"dtype": "float32"})
    cache = activations.ActivationCache(tmp_path / "corpus")
    vectors = torch.cat(list(cache.sentence_shards()))
    assert info["n_documents"] == 2 and info["source"] == "text" and len(vectors) == info["n_sentence_vectors"] == 7
    assert torch.allclose(vectors.mean(-1), torch.zeros(len(vectors)), atol=1e-4)  # standardised per token
    assert cache.index["id"].tolist() == sorted(cache.index["id"].tolist())


def test_token_budget_stops_after_the_document_that_reaches_it(tiny_model_dir, tmp_path):
    tokenizer = models.load_tokenizer(tiny_model_dir)
    backbone = models.load_truncated(tiny_model_dir, 2, torch.float32)
    texts = pd.DataFrame({"id": [0, 1, 2], "text": [DOCS[0], DOCS[3], DOCS[0]]})
    first = sum(len(w.input_ids) for w in activations.text_windows(tokenizer, DOCS[0], 16))
    info = activations.cache_texts(backbone, tokenizer, texts, tmp_path / "budget", 16, 4, meta={}, max_tokens=first + 1)
    cache = activations.ActivationCache(tmp_path / "budget")
    assert info["n_documents"] == 2 and info["n_documents_fetched"] == 3 and info["max_tokens"] == first + 1
    assert sorted(set(cache.index["id"])) == [0, 1] and info["n_tokens"] > first
