"""The frozen head trained on TopK latents stored sparse (indices + values) equals the dense path."""

import pandas as pd
import torch

from sarm import activations as A
from sarm.reward import train_head
from sarm.reward_model import RewardModel, SparseFeatures, sae_features


def test_sparse_latents_are_the_dense_latents(trained):
    root, _, _ = trained
    model = RewardModel.from_pretrained(root / "rm")
    hidden = A.ActivationCache(root / "train").final()
    dense = sae_features(model.sae, hidden, batch_size=5)
    sparse = sae_features(model.sae, hidden, batch_size=5, sparse=True)
    assert isinstance(sparse, SparseFeatures) and sparse.indices.shape == (len(hidden), model.sae.cfg.k)
    assert sparse.shape == dense.shape and (dense != 0).sum(1).tolist() == [model.sae.cfg.k] * len(hidden)
    assert torch.equal(sparse.to_dense(), dense)
    torch.testing.assert_close(sparse @ model.weight, dense @ model.weight, atol=1e-5, rtol=1e-6)
    assert sparse.nbytes * 4 < dense.nbytes  # k = 8 of 256 latents: 64 B a row instead of 1 KB


def test_head_trained_on_sparse_latents_matches_the_dense_head(trained):
    root, _, _ = trained
    sae = RewardModel.from_pretrained(root / "rm").sae
    train, val = A.ActivationCache(root / "train").final(), A.ActivationCache(root / "val").final()
    # more rows than the fixture's 8 pairs: its real states plus noise, so the head sees many batches
    g = torch.Generator().manual_seed(0)
    train = torch.cat(
        [train, A.standardize(train.repeat(12, 1) + 0.3 * torch.randn(12 * len(train), train.shape[1], generator=g))]
    )
    settings = dict(epochs=6, lr=0.05, batch_size=8, weight_decay=0.01, seed=3)
    dense_w, dense_h = train_head(sae_features(sae, train), sae_features(sae, val), **settings)
    sparse_w, sparse_h = train_head(sae_features(sae, train, sparse=True), sae_features(sae, val, sparse=True), **settings)
    assert dense_w.abs().max() > 0.01  # it learnt something
    torch.testing.assert_close(sparse_w, dense_w, atol=1e-5, rtol=1e-4)
    pd.testing.assert_frame_equal(sparse_h, dense_h, rtol=1e-4, atol=1e-6)
