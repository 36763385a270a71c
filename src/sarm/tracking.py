"""wandb runs for the training rules: off unless the config turns them on; outputs never depend on them."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def wandb_run(workflow_config: dict, job_type: str, name: str, config: dict):
    """Yield a wandb run (group = the experiment, job type = the rule), or None when mode is disabled.

    Settings come from the workflow config's `wandb` section, not from rule params, so turning wandb on
    or off never re-runs a rule."""
    settings = workflow_config.get("wandb", {})
    if settings.get("mode", "disabled") == "disabled":
        yield None
        return
    import wandb

    run = wandb.init(
        project=settings.get("project", "sarm"),
        entity=settings.get("entity"),
        group=workflow_config.get("experiment"),
        job_type=job_type,
        name=name,
        config=config,
        mode=settings["mode"],
        dir=os.getcwd(),
    )
    try:
        yield run
    finally:
        run.finish()
