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
    stream = S.shuffled_batches(lambda: shards, batch_size=4, buffer_size=8, seed=0)
    seen = torch.cat([next(stream) for _ in range(17)])  # 68 samples = 4 epochs of 17
    assert all(v == 4 for v in torch.bincount(seen.flatten().long()).tolist())


def test_empty_corpus_is_an_error():
    with pytest.raises(SarmError, match="SAE corpus is empty"):
        next(S.shuffled_batches(lambda: [], 4, 8, 0))


def test_trained_topk_sae_explains_held_out_sparse_data(tmp_path):
    data = sparse_data(4500)
    train, held_out = data[:4000], data[4000:]
    sae = S.train_sae(lambda: [train], d_in=32, d_sae=128, k=4, total_samples=40_000, batch_size=128, lr=3e-3)
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
