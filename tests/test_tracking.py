import torch

from sarm.reward import train_head
from sarm.tracking import wandb_run


def test_disabled_wandb_yields_no_run_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with wandb_run({"wandb": {"mode": "disabled"}}, "train_reward", "x", {}) as run:
        assert run is None
    assert not (tmp_path / "wandb").exists()


def test_offline_run_records_group_job_type_and_head_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    feats = torch.rand(40, 5, generator=torch.Generator().manual_seed(0))
    config = {"experiment": "smoke-group", "wandb": {"mode": "offline", "project": "sarm-test"}}
    with wandb_run(config, "train_reward", "sarm", {"lr": 0.1}) as run:
        assert run.group == "smoke-group" and run.job_type == "train_reward"
        train_head(feats[:32], feats[32:], epochs=3, lr=0.1, batch_size=8, log=run.log)
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    record = next(folder.glob("run-*.wandb")).read_bytes()
    assert record.count(b"val_accuracy") >= 3 and b"smoke-group" in record
