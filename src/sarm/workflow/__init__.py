"""What only the Snakemake workflow needs: the glue of `workflow/scripts/` (`run_script`: logging to the rule's log
file, threads, one-line user errors), each rule's resources (`sarm.workflow.resources`) and the SLURM checks run
at start and on failure (`sarm.workflow.slurm`). The library (`sarm.*` outside this package) never imports it."""

from __future__ import annotations

import logging
import sys
import traceback

from sarm.errors import SarmError


def run_script(snakemake, main) -> None:
    """Run `main(snakemake)` with logging sent to `snakemake.log[0]`; a SarmError ends the job with its one
    line (Snakemake then removes the job's outputs, so nothing partial is left)."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    import torch  # not at the top: the DAG imports this package's other modules before any job runs

    torch.set_num_threads(max(1, int(snakemake.threads)))
    try:
        main(snakemake)
    except SarmError as err:
        logging.getLogger("sarm").error("%s", err)
        sys.exit(f"ERROR: {err}")
    except Exception:
        logging.getLogger("sarm").error("unexpected failure:\n%s", traceback.format_exc())
        raise
