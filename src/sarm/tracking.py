"""wandb runs for the training rules: off unless the config turns them on; outputs never depend on them."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def wandb_run(settings: dict, job_type: str, name: str, config: dict):
    """Yield a wandb run (group = the experiment, job type = the rule), or None when mode is disabled."""
    if settings.get("mode", "disabled") == "disabled":
        yield None
        return
    import wandb

    run = wandb.init(
        project=settings.get("project", "sarm"),
        entity=settings.get("entity"),
        group=settings.get("group"),
        job_type=job_type,
        name=name,
        config=config,
        mode=settings["mode"],
        dir=settings.get("dir") or os.getcwd(),
    )
    try:
        yield run
    finally:
        run.finish()
