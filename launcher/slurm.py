"""The few SLURM commands the launcher runs: sbatch to submit, scontrol/sacct/the jobcomp file to read a job's state,
scancel to cancel. Nothing here parses more than it needs."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

# States in which a job may still run (SLURM's job_state_string names); anything else has ended.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)

_FIELD = re.compile(r"(\w+)=(\S*)")


class SlurmError(RuntimeError):
    """A SLURM command failed; the message carries its output and what to check."""


@dataclasses.dataclass(frozen=True)
class JobInfo:
    """A job as SLURM reports it. `state` is UNKNOWN when no source knows the job any more."""

    job_id: str
    state: str
    reason: str | None = None
    exit_code: str | None = None
    restarts: int | None = None
    nodes: str | None = None
    source: str = "none"
    """Where the state came from: scontrol, sacct, jobcomp, or none."""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def cancelled_by_dependency(self) -> bool:
        return self.state == "CANCELLED" and self.reason == "DependencyNeverSatisfied"


def require_slurm() -> None:
    """Refuse early, with the alternative, where SLURM's client commands are not installed."""
    missing = [exe for exe in ("sbatch", "scontrol", "scancel") if shutil.which(exe) is None]
    if missing:
        raise SlurmError(
            f"{', '.join(missing)} not found: run on a SLURM login node, start the local test cluster "
            "(slurm/localcluster.sh start DIR), or run the stages on this machine with --local"
        )


def _run(args: Sequence[str], env: Mapping[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=None if env is None else dict(env))
    if check and proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise SlurmError(f"`{' '.join(args)}` failed (exit {proc.returncode}): {output}")
    return proc


def sbatch(args: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Submit with `sbatch --parsable ARGS`; returns the job id."""
    proc = _run(["sbatch", "--parsable", *args], env=env)
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {proc.stdout.strip()!r} where a job id was expected")
    return job_id


def scancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


def parse_fields(line: str) -> dict[str, str]:
    """`Key=value Key2=value2 ...` (scontrol -o, the jobcomp file) -> dict; values end at the next space."""
    return {m.group(1): m.group(2) for m in _FIELD.finditer(line)}


def _from_scontrol(job_id: str) -> JobInfo | None:
    proc = _run(["scontrol", "show", "job", "-o", job_id], check=False)
    if proc.returncode != 0 or "JobState=" not in proc.stdout:
        return None  # "Invalid job id specified": SLURM no longer holds it (MinJobAge) or it never existed
    fields = parse_fields(proc.stdout.splitlines()[0])
    return JobInfo(
        job_id=job_id,
        state=fields.get("JobState", "UNKNOWN"),
        reason=fields.get("Reason") if fields.get("Reason") not in (None, "None") else None,
        exit_code=fields.get("ExitCode"),
        restarts=int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else None,
        nodes=fields.get("NodeList") if fields.get("NodeList") not in (None, "(null)") else None,
        source="scontrol",
    )


def _from_sacct(job_id: str) -> JobInfo | None:
    if shutil.which("sacct") is None:
        return None
    proc = _run(["sacct", "-X", "-n", "-P", "-j", job_id, "--format=State,ExitCode,NodeList,Reason"], check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return None  # no accounting database (accounting_storage/none) or job unknown to it
    state, exit_code, nodes, reason = (lines[-1].split("|") + ["", "", "", ""])[:4]
    return JobInfo(job_id, state.split()[0], reason or None, exit_code or None, None, nodes or None, "sacct")


def jobcomp_file() -> Path | None:
    """The job completion log when the cluster writes one (JobCompType=jobcomp/filetxt)."""
    proc = _run(["scontrol", "show", "config"], check=False)
    fields = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", proc.stdout, flags=re.M))
    if fields.get("JobCompType") != "jobcomp/filetxt" or not fields.get("JobCompLoc"):
        return None
    return Path(fields["JobCompLoc"])


def _from_jobcomp(job_id: str) -> JobInfo | None:
    path = jobcomp_file()
    if path is None or not path.is_file():
        return None
    last = None
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(f"JobId={job_id} "):
                last = line  # one line per run of the job; a requeued job has several
    if last is None:
        return None
    fields = parse_fields(last)
    nodes = fields.get("NodeList")
    return JobInfo(job_id, fields.get("JobState", "UNKNOWN"), None, fields.get("ExitCode"), None, nodes, "jobcomp")


def job_info(job_id: str) -> JobInfo:
    """The job's state from scontrol, else sacct, else the jobcomp file; UNKNOWN when none knows it."""
    for source in (_from_scontrol, _from_sacct, _from_jobcomp):
        info = source(job_id)
        if info is not None:
            return info
    return JobInfo(job_id, "UNKNOWN")
