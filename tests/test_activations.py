import numpy as np
import pandas as pd
import pytest
import torch

from sarm import activations as A
from sarm import models


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_truncated(tiny_model_dir, 2, torch.float32)


def pieces(tokenizer, encoded, positions):
    return [tokenizer.decode([int(encoded.input_ids[i])]) for i in positions]


def test_final_token_is_the_end_of_turn_token(tokenizer):
    e = A.encode(tokenizer, [{"role": "user", "content": "Hi there."}], "Hello!", 512)
    assert tokenizer.decode([int(e.input_ids[-1])]) == "<|im_end|>"


def test_sentence_final_tokens_are_the_ends_of_punctuation_runs_in_content(tokenizer):
    e = A.encode(tokenizer, [{"role": "user", "content": "Hello. How are you?"}], "Fine, thanks!! And you?\nGreat.", 512)
    # "?" + "\n" is one run: only its last token counts; the template's own newlines never count.
    assert pieces(tokenizer, e, e.sentence_ends) == [".", "?", ",", "!!", "\n", "."]
    text = A.render(tokenizer, [{"role": "user", "content": "Hello. How are you?"}], "x")
    assert text.count("\n") > 0  # the template has newlines, none of which were picked


def test_truncation_keeps_the_end(tokenizer):
    prompt = [{"role": "user", "content": "word " * 100}]
    full = A.encode(tokenizer, prompt, "The end. Done.", 10_000)
    cut = A.encode(tokenizer, prompt, "The end. Done.", 20)
    assert cut.truncated and not full.truncated and len(cut.input_ids) == 20
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[-20:])
    assert pieces(tokenizer, cut, cut.sentence_ends) == pieces(tokenizer, full, full.sentence_ends[-2:])


def test_standardize_is_per_token():
    h = torch.randn(3, 7, 16) * 5 + 2
    s = A.standardize(h)
    torch.testing.assert_close(s.mean(-1), torch.zeros(3, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.std(-1), torch.ones(3, 7), atol=1e-4, rtol=0)


def test_length_sorted_batches_cover_every_index_once():
    batches = A.length_sorted_batches([5, 1, 9, 3, 7], 2)
    assert batches == [[2, 4], [0, 3], [1]]


def test_padding_does_not_change_a_sequence(tokenizer, tiny):
    a = A.encode(tokenizer, [{"role": "user", "content": "A short one."}], "Yes.", 512)
    b = A.encode(tokenizer, [{"role": "user", "content": "A much longer question, with more words in it?"}], "No, sorry.", 512)
    together, sents = A.forward_batch(tiny, [a, b], tokenizer.pad_token_id, "cpu", True)
    alone, alone_sents = A.forward_batch(tiny, [a], tokenizer.pad_token_id, "cpu", True)
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sents[0], alone_sents[0], atol=1e-5, rtol=0)
    assert sents[1].shape == (len(b.sentence_ends), 64)


def test_cache_round_trip_matches_direct_forward(tokenizer, tiny, hh_pairs, tmp_path):
    info = A.cache_activations(tiny, tokenizer, hh_pairs, tmp_path / "c", max_length=128, batch_size=5, shard_size=7)
    cache = A.ActivationCache(tmp_path / "c")
    assert info["n_shards"] == len(cache.shards) > 1 and info["n_sequences"] == 2 * len(hh_pairs)
    final = cache.final()
    seqs = A.pair_sequences(hh_pairs)
    for row in (0, 5, len(seqs) - 1):  # chosen of pair 0, rejected of pair 2, the last rejected
        e = A.encode(tokenizer, seqs.prompt[row], seqs.response[row], 128)
        direct, _ = A.forward_batch(tiny, [e], tokenizer.pad_token_id, "cpu", False)
        torch.testing.assert_close(final[row], direct[0], atol=1e-5, rtol=0)
    n_sent = sum(len(s) for s in cache.sentence_shards())
    assert n_sent == info["n_sentence_vectors"] == cache.index["n_sentences"].sum() > 0
    assert list(cache.index.loc[cache.index.side == "chosen", "id"]) == list(hh_pairs.id)


def test_unfinished_cache_is_refused(tmp_path):
    from sarm.errors import SarmError

    (tmp_path / "shard_00000.safetensors").write_bytes(b"half")
    with pytest.raises(SarmError, match="not a finished activation cache"):
        A.ActivationCache(tmp_path)
