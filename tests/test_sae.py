import pandas as pd
import pytest
import torch

from sarm import sae as S
from sarm.errors import SarmError


def sparse_data(n, d_in=32, n_atoms=64, active=3, seed=0):
    """Vectors that are sums of `active` of `n_atoms` random unit directions plus an offset: an SAE of
    width >= n_atoms and k >= active can explain them almost fully."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d_in, generator=g), dim=1)
    codes = torch.zeros(n, n_atoms)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    codes.scatter_(1, idx, torch.rand(n, active, generator=g) * 2 + 1)
    return codes @ atoms + 0.5


def test_defaults_follow_the_paper():
    assert S.default_width(4096) == 65536 and S.default_k(4096) == 192
    assert S.default_width(576) == 9216 and S.default_k(576) == 27


@pytest.mark.parametrize("k", [128, 200, 0])
def test_k_must_be_below_width(k):
    with pytest.raises(SarmError, match=f"sae.k = {k} must be between 1 and the SAE width - 1"):
        S.check_shape(128, k)


def test_shuffled_batches_are_full_and_cover_the_corpus():
    shards = [torch.arange(10.0)[:, None], torch.arange(10.0, 17.0)[:, None]]
    stream = S.shuffled_batches(shards, batch_size=4, buffer_size=8, seed=0)
    seen = torch.cat([next(stream) for _ in range(17)])  # 68 samples = 4 epochs of 17
    assert all(v == 4 for v in torch.bincount(seen.flatten().long()).tolist())


def test_empty_corpus_is_an_error():
    with pytest.raises(SarmError, match="SAE corpus is empty"):
        next(S.shuffled_batches([], 4, 8, 0))


def test_trained_topk_sae_explains_held_out_sparse_data(tmp_path):
    data = sparse_data(4500)
    train, held_out = data[:4000], data[4000:]
    sae = S.train_sae([train], d_in=32, d_sae=128, k=4, total_samples=40_000, batch_size=128, lr=3e-3)
    S.save_sae(sae, tmp_path / "sae")
    loaded = S.load_sae(tmp_path / "sae")
    metrics = S.evaluate_sae(loaded, held_out)
    assert metrics["l0"] == 4.0  # TopK: exactly k latents fire
    assert metrics["fvu"] < 0.2, metrics
    assert 0.0 <= metrics["dead_fraction"] < 0.9
    torch.testing.assert_close(loaded.encode(held_out[:5]), sae.encode(held_out[:5]), atol=1e-5, rtol=0)


def test_fvu_of_a_perfect_and_a_useless_reconstruction():
    class Fixed(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.cfg = type("cfg", (), {"d_sae": 2})()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.out = out

        def encode(self, x):
            return torch.stack([x[:, 0], torch.zeros(len(x))], 1)

        def decode(self, z):
            return self.out(z)

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    perfect = S.evaluate_sae(Fixed(lambda z: x), x)
    mean = S.evaluate_sae(Fixed(lambda z: x.mean(0).expand_as(x)), x)
    assert perfect["fvu"] == 0.0 and mean["fvu"] == pytest.approx(1.0)
    assert perfect["l0"] == 1.0 and perfect["dead_fraction"] == 0.5  # latent 1 never fires


def test_corrupted_sae_file_names_the_folder(tmp_path):
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SarmError, match=f"SAE at {tmp_path} could not be loaded"):
        S.load_sae(tmp_path)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation, ties sharing their average rank (most truncated sequences have the same length)."""
    return float(pd.Series(a.numpy()).rank().corr(pd.Series(b.numpy()).rank()))


@pytest.fixture(scope="module")
def length_sorted_cache(tiny_model_dir, shared_data, tmp_path_factory):
    """200 real HH-RLHF pairs cached by the tiny model in 50 shards, written longest sequences first (one sequence a
    row: tokenised beforehand, so no prompt is shared in a packed row and the order is each sequence's length)."""
    from sarm import activations as A
    from sarm import models
    from sarm.data import load_pairs

    pairs, _ = load_pairs(
        "hh", {"path": str(shared_data / "hh-rlhf/helpful-base/test.jsonl.gz"), "format": "hh_rlhf", "max_pairs": 200}
    )
    folder = tmp_path_factory.mktemp("sorted-cache")
    backbone, tokenizer = models.load_truncated(tiny_model_dir, 2, torch.float32), models.load_tokenizer(tiny_model_dir)
    sequences = A.pair_sequences(pairs)
    encoded = [A.encode(tokenizer, p, r, 128) for p, r in zip(sequences.prompt, sequences.response)]
    A.cache_sequences(
        backbone,
        tokenizer,
        sequences.drop(columns=["prompt", "response"]),
        folder,
        max_length=128,
        batch_size=8,
        shard_size=8,
        meta={"dtype": "float32"},
        encoded=encoded,
    )
    return A.ActivationCache(folder)


def test_sae_stream_is_close_to_iid_over_a_length_sorted_cache(length_sorted_cache):
    """The SAE's batches follow neither the cache's length order nor its split into sentence and final states."""
    cache = length_sorted_cache
    n_tokens = torch.tensor(cache.index["n_tokens"].to_numpy())
    final_tag = len(n_tokens)  # final-token states carry seq + final_tag, sentence ends carry seq
    chunks = S.cache_chunks(cache, "sent", "sequences")
    chunks += [lambda load=load: load() + final_tag for load in S.cache_chunks(cache, "final", "sequences")]
    in_cache_order = torch.cat([c() for c in chunks]).flatten().long()
    epoch = len(in_cache_order)
    assert len(chunks) == 2 * cache.meta["n_shards"] >= 100 and epoch > 2000

    stream = S.shuffled_batches(chunks, batch_size=32, buffer_size=512, seed=0)
    order = torch.cat([next(stream) for _ in range(epoch // 32)]).flatten().long()
    lengths = lambda tags: n_tokens[tags % final_tag]  # noqa: E731

    # read in the order it was cached, a vector's position follows its sequence's length; in the stream it does not
    assert abs(_spearman(torch.arange(epoch), lengths(in_cache_order))) > 0.5
    assert abs(_spearman(torch.arange(len(order)), lengths(order))) < 0.15  # seeds 0, 1, 2: 0.06, 0.03, -0.12
    # the final-token states are spread over the epoch, not one block at its end
    where_final = (order >= final_tag).nonzero().flatten().double() / len(order)
    quarters = torch.histc(where_final, bins=4, min=0, max=1) / len(where_final)
    assert ((quarters > 0.1) & (quarters < 0.45)).all(), quarters  # shuffled in chunks of a shard: not exactly 1/4
    # one epoch's worth of batches draws each vector about once
    assert len(order.unique()) > 0.9 * len(in_cache_order.unique())


def test_b_dec_starts_at_the_mean_of_a_random_sample_not_of_the_first_shards():
    """Chunks 0..9 hold 0s, chunks 10..19 hold 1s: the first shards' mean would be 0."""
    chunks = [torch.zeros(10, 1)] * 10 + [torch.ones(10, 1)] * 10
    assert 0.2 < float(S.corpus_mean(chunks, max_vectors=100)) < 0.8
    assert float(S.corpus_mean(chunks, max_vectors=10_000)) == pytest.approx(0.5)


def test_saved_sae_decoder_rows_have_unit_norm(tmp_path):
    data = sparse_data(2000)
    sae = S.train_sae([data], d_in=32, d_sae=128, k=4, total_samples=8000, batch_size=128, lr=3e-3)
    assert sae.cfg.rescale_acts_by_decoder_norm
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-3  # while training, the norms drift
    S.save_sae(sae, tmp_path / "sae")
    loaded = S.load_sae(tmp_path / "sae")
    torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(128), atol=1e-5, rtol=0)
    # the norms were folded into the encoder: the saved SAE reconstructs what the trained one did
    torch.testing.assert_close(loaded.decode(loaded.encode(data[:50])), sae.decode(sae.encode(data[:50])), atol=1e-4, rtol=0)
