"""`python -m launcher status RUN_ROOT`: each stage's state from SLURM and from its run directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from launcher import slurm
from launcher.pipeline import STATE_FILE, read_state, read_status
from relret.run_dir import Status, describe_dead, liveness


@dataclasses.dataclass
class StageStatus:
    """One stage as the user sees it: SLURM's view, the run directory's view, and one word that sums them up."""

    stage: str
    state: str
    """completed, running, pending, requeued, failed, interrupted, cancelled, disabled or not submitted."""
    detail: str
    job_id: str | None
    slurm_state: str | None
    slurm_reason: str | None
    restarts: int | None
    run_state: str | None
    step: int | None
    total_steps: int | None
    checkpoint: str | None
    init_from: str | None
    run_dir: str
    log: str | None


def _summary(enabled: bool, job: slurm.JobInfo | None, run: Status | None) -> tuple[str, str]:
    run_state = run.state if run is not None else None
    if not enabled:
        return "disabled", ""
    if run_state == "completed":
        return "completed", ""
    if job is None:
        if run is None:
            return "not submitted", ""
        if run_state == "running":
            alive = liveness(run)
            if alive == "dead":
                return "dead", f"status.json says running but {describe_dead(run)}; run the same command again"
            return ("running", "") if alive == "alive" else ("running?", "written on another host, no heartbeat")
        return run_state, run.message or ""
    if job.active:
        word = {"PENDING": "pending", "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued"}.get(job.state, "running")
        why = f"waiting: {job.reason}" if word == "pending" and job.reason and job.reason != "None" else ""
        return word, why
    if job.cancelled_by_dependency:
        return "cancelled", "a stage it depends on failed (DependencyNeverSatisfied); submit the pipeline again"
    if job.state == "CANCELLED":
        return "cancelled", "cancelled (scancel or the cluster)"
    if job.state == "UNKNOWN":
        return (run_state or "unknown"), f"SLURM no longer knows job {job.job_id}"
    if run_state == "interrupted":
        return "interrupted", f"job {job.state} (exit {job.exit_code}); submit the pipeline again to resume"
    return "failed", f"job {job.state} (exit {job.exit_code}); see the log, then submit the pipeline again"


def pipeline_status(root: Path) -> list[StageStatus]:
    """Every stage recorded in RUN_ROOT/pipeline.json, in the order the pipeline runs them."""
    if not (root / STATE_FILE).is_file():
        raise RuntimeError(f"{root / STATE_FILE} does not exist: {root} is not a pipeline run root (see its run_root)")
    state = read_state(root)
    rows = []
    for name, record in state["stages"].items():
        job_id = record.get("job_id")
        job = slurm.job_info(job_id) if job_id else None
        run = read_status(Path(record["run_dir"]))
        word, why = _summary(record.get("enabled", True), job, run)
        fields = dataclasses.asdict(run) if run is not None else {}
        rows.append(
            StageStatus(
                stage=name,
                state=word,
                detail=why,
                job_id=job_id,
                slurm_state=job.state if job else None,
                slurm_reason=job.reason if job else None,
                restarts=job.restarts if job else None,
                run_state=fields.get("state"),
                step=fields.get("step"),
                total_steps=fields.get("total_steps"),
                checkpoint=fields.get("checkpoint"),
                init_from=fields.get("init_from"),
                run_dir=record["run_dir"],
                log=record.get("log"),
            )
        )
    return rows


def format_table(rows: list[StageStatus]) -> str:
    lines = [f"{'stage':<20} {'state':<13} {'job':<8} {'slurm':<24} {'run':<30} detail"]
    for r in rows:
        slurm_text = (
            "-" if r.slurm_state is None else r.slurm_state + (f" ({r.restarts} restarts)" if r.restarts else "")
        )
        run_text = r.run_state or "-"
        if r.step is not None:
            run_text += f" step {r.step}" + (f"/{r.total_steps}" if r.total_steps else "")
        if r.checkpoint:
            run_text += f" ckpt {r.checkpoint}"
        lines.append(f"{r.stage:<20} {r.state:<13} {r.job_id or '-':<8} {slurm_text:<24} {run_text:<30} {r.detail}")
    logs = [f"  {r.stage}: {r.log}" for r in rows if r.log]
    if logs:
        lines += ["", "logs (one per job, appended across restarts):", *logs]
    return "\n".join(lines)


def to_json(rows: list[StageStatus]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in rows], indent=2)
