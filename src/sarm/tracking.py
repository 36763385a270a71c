"""wandb runs for the training rules: off unless the config (or WANDB_MODE) turns them on; outputs never
depend on them.

- group = config key `experiment`, job type = the rule, name = the rule's wildcards (e.g. `sarm`);
- mode: config key `wandb.mode`, overridden by the environment's WANDB_MODE (e.g. `offline` on compute nodes
  without internet; then `wandb sync wandb/offline-run-*` from a login node);
- the run id is derived from (experiment, rule, name, the run's settings), and runs resume with
  `resume="allow"`: a retried job (SLURM killed it, Snakemake resubmitted it) continues the same run, and a
  changed setting starts a new one;
- runs are written under WANDB_DIR, else the working directory (`wandb/`);
- several processes (torchrun sets RANK): only rank 0 opens a run, the others get None, so one job is one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

MODES = {"disabled", "offline", "online"}
LEGACY_MODES = {"dryrun": "offline", "run": "online"}  # older spellings wandb itself still reads


def wandb_mode(workflow_config: dict) -> str:
    """WANDB_MODE when set (and valid), else config key wandb.mode."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = LEGACY_MODES.get(env, env)
    if env in MODES:
        return env
    return workflow_config.get("wandb", {}).get("mode", "disabled")


def run_id(workflow_config: dict, job_type: str, name: str, config: dict) -> str:
    """A stable wandb run id: the same for every attempt of one job, new when its settings change."""
    key = json.dumps([workflow_config.get("experiment"), job_type, name, config], sort_keys=True, default=str)
    return f"{job_type}-{hashlib.sha256(key.encode()).hexdigest()[:16]}".replace("_", "-")


@contextlib.contextmanager
def wandb_run(workflow_config: dict, job_type: str, name: str, config: dict):
    """Yield a wandb run (group = the experiment, job type = the rule), or None when mode is disabled or this
    is not the main process (RANK > 0 under torchrun).

    Settings come from the workflow config's `wandb` section (and WANDB_* variables), not from rule params,
    so turning wandb on or off never re-runs a rule."""
    settings = workflow_config.get("wandb", {})
    mode = wandb_mode(workflow_config)
    if mode == "disabled" or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    import wandb

    model = workflow_config.get("model", {})
    run = wandb.init(
        project=settings.get("project", "sarm"),
        entity=settings.get("entity"),
        group=workflow_config.get("experiment"),
        job_type=job_type,
        name=name,
        id=run_id(workflow_config, job_type, name, config),
        resume="allow",
        config={
            **config,
            "experiment": workflow_config.get("experiment"),
            "model_name": model.get("name"),
            "layer": model.get("layer"),
        },
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or os.getcwd(),
    )
    try:
        yield run
    finally:
        run.finish()
        # finish() can return before wandb-core has written the run file; teardown waits for it (at exit
        # wandb does the same), so the offline folder is complete when the rule's script goes on
        wandb.teardown()


def _log_records(path, block: int = 32768):
    """The records of a wandb transaction log (LevelDB log format: 7-byte chunk headers in 32 KiB blocks,
    after wandb's own 7-byte file header)."""
    import struct

    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk


def read_offline_run(folder) -> dict:
    """What an offline run folder (wandb/offline-run-*) holds: {id, group, job_type, name, config, history}
    config and history rows as Python values; e.g. to check a run before `wandb sync`."""
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(folder).glob("run-*.wandb")
    # a run killed by SIGKILL may hold no record at all; its folder still names the run id
    out = {"id": path.stem.removeprefix("run-"), "config": {}, "history": []}
    for data in _log_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, group=run.run_group, job_type=run.job_type, name=run.display_name)
            out["config"].update({i.key: json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update if i.key and i.key != "_wandb"})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return out
