"""kill -9 during training, then resume: the result equals an uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import torch

from sarm import checkpoints
from sarm.sae import train_sae

SAE_RUN = textwrap.dedent(
    """
    import sys, torch
    from sarm.sae import train_sae
    data = torch.randn(3000, 16, generator=torch.Generator().manual_seed(0))
    train_sae([data[:1500], data[1500:]], 16, 64, 4, total_samples=24_000, batch_size=200,
              lr=3e-3, buffer_size=1000, checkpoint_root=sys.argv[1], n_checkpoints=5)
    """
)


def sae_corpus():
    data = torch.randn(3000, 16, generator=torch.Generator().manual_seed(0))
    return [data[:1500], data[1500:]]


def test_sae_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    root = tmp_path / "ckpt"
    # 120 steps in all; checkpoints every 4,000 samples (20 steps); killed at step 70.
    died = subprocess.run([sys.executable, "-c", SAE_RUN, str(root)], env={**os.environ, "SARM_KILL_AT": "sae:70"})
    assert died.returncode == -signal.SIGKILL
    resume_point = checkpoints.latest(root)
    assert resume_point is not None and int(resume_point.name) == 12_200  # the last one before the kill (61 batches of 200)

    kwargs = dict(d_in=16, d_sae=64, k=4, total_samples=24_000, batch_size=200, lr=3e-3, buffer_size=1000)
    resumed = train_sae(sae_corpus(), checkpoint_root=root, n_checkpoints=5, **kwargs)
    uninterrupted = train_sae(sae_corpus(), **kwargs)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_half_written_checkpoint_is_never_read(tmp_path):
    (tmp_path / "400").mkdir()
    (tmp_path / "400" / "sae_weights.safetensors").write_bytes(b"cut short")
    (tmp_path / "200").mkdir()
    checkpoints.mark_complete(tmp_path / "200")
    assert checkpoints.latest(tmp_path).name == "200"


def test_checkpoints_of_other_settings_are_discarded(tmp_path):
    root = checkpoints.open_root(tmp_path / "c", {"lr": 1})
    (root / "100").mkdir()
    checkpoints.mark_complete(root / "100")
    assert checkpoints.latest(checkpoints.open_root(tmp_path / "c", {"lr": 1})) is not None
    assert checkpoints.latest(checkpoints.open_root(tmp_path / "c", {"lr": 2})) is None


HEAD_RUN = textwrap.dedent(
    """
    import sys, torch
    from sarm.reward import train_head
    feats = torch.rand(200, 12, generator=torch.Generator().manual_seed(1))
    train_head(feats[:160], feats[160:], epochs=6, lr=0.05, batch_size=16, checkpoint_root=sys.argv[1])
    """
)


def test_head_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    from sarm.reward import train_head

    root = tmp_path / "head"
    died = subprocess.run([sys.executable, "-c", HEAD_RUN, str(root)], env={**os.environ, "SARM_KILL_AT": "head:4"})
    assert died.returncode == -signal.SIGKILL and checkpoints.latest(root).name == "3"
    feats = torch.rand(200, 12, generator=torch.Generator().manual_seed(1))
    resumed, resumed_history = train_head(feats[:160], feats[160:], epochs=6, lr=0.05, batch_size=16, checkpoint_root=root)
    weight, history = train_head(feats[:160], feats[160:], epochs=6, lr=0.05, batch_size=16)
    assert torch.equal(resumed, weight)
    assert resumed_history.equals(history) and len(history) == 6
