"""Resumable training: checkpoint folders that are complete or ignored, and a fault-injection point.

A checkpoint counts only once its `COMPLETE` marker exists (written last), so a save cut short by a kill
is never read. Each checkpoint root holds `fingerprint.json`: checkpoints made under other settings or
inputs are discarded rather than resumed. `SARM_KILL_AT=<stage>:<step>` makes the process SIGKILL itself
at that step: how the tests kill training at a known point.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
FINGERPRINT = "fingerprint.json"


def open_root(root: str | Path, fingerprint: dict) -> Path:
    """The checkpoint root for these settings; stale checkpoints (another fingerprint) are removed."""
    root = Path(root)
    recorded = root / FINGERPRINT
    if root.exists() and (not recorded.exists() or json.loads(recorded.read_text()) != fingerprint):
        log.warning("discarding checkpoints in %s: they were made with other settings or inputs", root)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(fingerprint, sort_keys=True))
    return root


def mark_complete(folder: str | Path) -> None:
    Path(folder, MARKER).touch()


def latest(root: str | Path | None) -> Path | None:
    """The complete checkpoint with the highest numeric name, or None."""
    if root is None or not Path(root).is_dir():
        return None
    done = [p for p in Path(root).iterdir() if p.is_dir() and p.name.isdigit() and (p / MARKER).exists()]
    return max(done, key=lambda p: int(p.name)) if done else None


def remove(root: str | Path | None) -> None:
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def fault_point(stage: str, step: int) -> None:
    """SIGKILL this process when SARM_KILL_AT names this stage and step (tests only); with SARM_KILL_ONCE (a
    marker file), only the first time, so that a retried job runs through."""
    if os.environ.get("SARM_KILL_AT") == f"{stage}:{step}":
        once = os.environ.get("SARM_KILL_ONCE")
        if once:
            if os.path.exists(once):
                return
            open(once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
