"""SLURM, seen from the workflow: checks before the first submission (Snakemake's `onstart`) and the reasons SLURM
gives for a failed job (`onerror`)."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

PLACEHOLDER = "CHANGE-ME"


def check_submission(workflow) -> None:
    """Before the first SLURM submission (Snakemake's `onstart`): stop on a profile placeholder left in; stop
    when the controller (`sinfo`) or the accounting daemon (`sacct`, which the executor reads job states
    from) does not answer, naming which; stop when a job asks for more GPUs than any node of its partition
    has (it would wait in the queue forever); warn when a one-machine GPU limit (profiles/default's
    `resources: gpu=1`) would serialise GPU jobs."""
    from snakemake.exceptions import WorkflowError
    from snakemake.logging import logger

    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or plugin.name != "slurm":
        return
    jobs = [job for job in workflow.dag.needrun_jobs() if not job.is_local]
    for job in jobs:
        for key in ("slurm_account", "slurm_partition"):
            if str(job.resources.get(key, "")).strip() == PLACEHOLDER:
                raise WorkflowError(
                    f"profiles/slurm/config.yaml: {key} is still the placeholder {PLACEHOLDER!r} (rule {job.rule.name}): "
                    "set it to yours, or delete the line where your cluster needs none"
                )
    nodes = slurm_command(["sinfo", "--noheader", "--Node", "--format=%P|%G"], "the SLURM controller (slurmctld)")
    slurm_command(["sacct", "--noheader", "--allocations", "--starttime=now", "--format=JobID"], "SLURM accounting (slurmdbd)")
    capacity, default = gpus_per_partition(nodes)
    short = {}
    for job in jobs:
        asked = job.resources.get("gpu", 0)
        partition = str(job.resources.get("slurm_partition", "") or default)
        if isinstance(asked, int) and asked > 0 and partition in capacity and asked > capacity[partition]:
            short.setdefault((partition, capacity[partition]), {})[job.rule.name] = asked
    for (partition, has), rules in short.items():
        asks = ", ".join(f"{rule} asks for {n}" for rule, n in sorted(rules.items()))
        raise WorkflowError(
            f"SLURM partition {partition!r} has no node with more than {has} GPU(s) (sinfo -o %G), but {asks}: such "
            "jobs would wait in the queue forever. Run on the CPU (config key device: cpu), or give those rules a GPU "
            "partition (slurm_partition under set-resources in profiles/slurm/config.yaml)"
        )
    limit = workflow.global_resources.get("gpu")
    limit = getattr(limit, "value", limit)
    gpu_jobs = sum(1 for job in jobs if job.resources.get("gpu", 0))
    if isinstance(limit, int) and gpu_jobs > limit:
        logger.warning(
            f"--resources gpu={limit} runs at most {limit} GPU job(s) at a time on the cluster (profiles/default is "
            "applied along with --profile; use --workflow-profile profiles/slurm instead)"
        )


SLURM_TIMEOUT_S = 30  # a SLURM client command slower than this counts as its daemon being down


def slurm_command(command: list[str], daemon: str) -> str:
    """Run a SLURM client command and return its output; when it is missing, fails or hangs, one WorkflowError
    naming the daemon it needs and the command."""
    from snakemake.exceptions import WorkflowError

    shown = shlex.join(command)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except FileNotFoundError:
        raise WorkflowError(
            f"SLURM: `{command[0]}` is not installed here: run Snakemake where the SLURM commands are (a login node)"
        ) from None
    except subprocess.TimeoutExpired:
        raise WorkflowError(f"SLURM: {daemon} did not answer `{shown}` within {SLURM_TIMEOUT_S} s") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise WorkflowError(
            f"SLURM: {daemon} is not reachable: `{shown}` failed ({lines[-1] if lines else f'exit status {result.returncode}'}). "
            "Is the cluster up? (on this machine: tests/slurm/up.sh)"
        )
    return result.stdout


def gpus_per_partition(sinfo_nodes: str) -> tuple[dict[str, int], str | None]:
    """The most GPUs one node of each partition has, and the default partition, from `sinfo -N -o '%P|%G'`
    (gres such as `gpu:4`, `gpu:a100:4(S:0-1)`, `gpu:1,shard:2` or `(null)`)."""

    capacity: dict[str, int] = {}
    default = None
    for line in sinfo_nodes.splitlines():
        if "|" not in line:
            continue
        partition, gres = line.strip().split("|", 1)
        if partition.endswith("*"):
            partition = default = partition[:-1]
        gpus = sum(int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))
        capacity[partition] = max(capacity.get(partition, 0), gpus)
    return capacity, default


def explain_slurm_failures(workflow, log) -> list[str]:
    """After a failed run (Snakemake's `onerror`): one line per failed SLURM job saying why SLURM ended it
    (its time limit, its memory: the plugin itself says only 'FAILED'), from sacct and the job's SLURM log.
    Returns the lines, which are also logged."""

    from snakemake.logging import logger

    plugin = getattr(workflow, "executor_plugin", None)
    if plugin is None or plugin.name != "slurm":
        return []
    logs = [log] if isinstance(log, (str, Path)) else list(log or [])  # Snakemake 9 passes a list
    text = "".join(Path(f).read_text(errors="replace") for f in logs if Path(f).is_file())
    lines = []
    for block in re.finditer(r"Error in rule (\S+):\n\s+message: SLURM-job '(\d+)' failed(.*?)external_jobid", text, re.S):
        rule, jobid = block.group(1), block.group(2)
        found = re.search(rf"(\S*slurm_logs\S*/{jobid}\.log)", block.group(3))
        slurm_log = found.group(1) if found else None
        why = _failure_reason(jobid, slurm_log)
        where = f"; its SLURM log: {slurm_log}" if slurm_log else ""
        lines.append(f"SLURM job {jobid} (rule {rule}) {why}{where}")
    for line in lines:
        logger.error(line)
    return lines


def _sacct_mb(text: str) -> float | None:

    m = re.match(r"([\d.]+)([KMGT]?)", text or "")
    if not m:
        return None
    return float(m.group(1)) * {"": 1 / 2**20, "K": 1 / 1024, "M": 1, "G": 1024, "T": 2**20}[m.group(2)]


def _failure_reason(jobid: str, slurm_log: str | None) -> str:

    try:
        out = subprocess.run(
            ["sacct", "-j", jobid, "--noheader", "--parsable2", "--format=State,ExitCode,MaxRSS,ReqMem,Elapsed,Timelimit"],
            capture_output=True,
            text=True,
            timeout=SLURM_TIMEOUT_S,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 5]
    if not rows:
        return "failed (sacct knows nothing of it)"
    state, exit_code, _, asked, elapsed, limit = rows[0]
    peak = max((_sacct_mb(r[2]) or 0 for r in rows), default=0)
    asked_mb = _sacct_mb(asked.rstrip("nc"))
    log_text = Path(slurm_log).read_text(errors="replace") if slurm_log and Path(slurm_log).is_file() else ""
    states = {r[0].split()[0] for r in rows}
    if "TIMEOUT" in states or "DUE TO TIME LIMIT" in log_text:
        return f"was killed by SLURM at its time limit ({limit}, the rule's runtime) after {elapsed}: ask for more runtime, or let --retries ask for attempt x runtime"
    if "OUT_OF_MEMORY" in states or re.search(r"oom[-_]kill|exceeded (job )?memory limit", log_text, re.I):
        size = f" (peak {peak:.0f} MB of the {asked_mb:.0f} MB asked)" if peak and asked_mb else f" ({asked} asked)"
        return f"was killed by SLURM over its memory{size}: ask for more mem_mb, or let --retries ask for attempt x mem_mb"
    return f"failed with SLURM state {state} (exit code {exit_code}) after {elapsed}: the rule's log says why"
