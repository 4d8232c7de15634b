"""Submitting the pipeline: each stage an sbatch job, chained with afterok, resumable by submitting again.

What a second submission does, stage by stage in dependency order:
- status.json in the stage's run directory says "completed": nothing (its dependants do not wait for it);
- its last job (from RUN_ROOT/pipeline.json) is still pending, running or requeued: nothing; dependants wait on it;
- otherwise (never submitted, failed, cancelled, or a dependency that failed): submitted again. Training resumes
  from the run directory's own checkpoint, so a failed stage continues where its last checkpoint left it.
Every job is submitted with --kill-on-invalid-dep=yes: when a parent fails, SLURM cancels its dependants instead of
leaving them pending for ever (DependencyNeverSatisfied).

`run_local` runs the same stages one after another on this machine, training through the deepspeed launcher.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from launcher import grid, slurm
from launcher.config import REPO, PipelineConfig, absolute, changed_config_problems
from relret import run_dir as run_contract
from relret.config import ConfigError, TrainConfig, load_config, to_dict
from relret.run_dir import EXIT_INTERRUPTED as INTERRUPTED
from relret.run_dir import Status, write_json_atomic

STATE_FILE = "pipeline.json"

Print = Callable[[str], None]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_status(run_dir: Path) -> Status | None:
    """A run directory's status.json (the run-directory contract, `relret.run_dir`), or None."""
    return run_contract.read_status(run_dir)


def is_completed(run_dir: Path) -> bool:
    status = read_status(run_dir)
    return status is not None and status.state == "completed"


def read_state(root: Path) -> dict[str, Any]:
    path = root / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RuntimeError(
            f"{path} is not valid JSON ({exc}); move it away to start the pipeline's record afresh"
        ) from None
    state.setdefault("stages", {})
    return state


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One launcher at a time per run root, so that two submissions cannot both submit a stage."""
    with open(root / ".pipeline.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another launcher is submitting to {root}; wait for it and try again") from None
        yield


# ---------------------------------------------------------------------------------------------------------------------
# What each stage runs


def python_of(cfg: PipelineConfig) -> str:
    return cfg.python or sys.executable


def train_script(cfg: PipelineConfig) -> Path:
    return absolute(cfg.train_script, REPO)


_PLACEHOLDER = re.compile(r"\{(python|run_root|run_dir|repo)\}|\{stages\[([^\]]*)\]\}")


def stage_args(cfg: PipelineConfig, name: str) -> list[str]:
    """The arguments after the sbatch script: relret/train.py's for training, the command for other stages.

    Placeholders {python}, {run_root}, {run_dir}, {repo} and {stages[NAME]} are filled in commands and overrides;
    any other brace is left as written (YAML flow values such as `data.train=[{path: X}]` need no escaping)."""
    stage = cfg.stages[name]
    run_dir = cfg.run_dir(name)
    values = {"python": python_of(cfg), "run_root": str(absolute(cfg.run_root)), "run_dir": str(run_dir)}
    values["repo"] = str(REPO)

    def fill(key: str, items: list[str]) -> list[str]:
        def one(match: re.Match) -> str:
            if match.group(1):
                return values[match.group(1)]
            other = match.group(2)
            if other not in cfg.stages:
                raise ConfigError(f"{key}: {match.group(0)} names no stage; the stages are: {', '.join(cfg.stages)}")
            return str(cfg.run_dir(other))

        return [_PLACEHOLDER.sub(one, item) for item in items]

    if stage.kind == "command":
        return fill(f"stages.{name}.command", stage.command)
    args = ["--config", str(cfg.train_config(name)), "--run-dir", str(run_dir)]
    if stage.init_from:
        args += ["--init-from", str(cfg.run_dir(stage.init_from))]
    return args + fill("overrides", cfg.overrides) + fill(f"stages.{name}.overrides", stage.overrides)


def stage_env(cfg: PipelineConfig, name: str) -> dict[str, str]:
    """What the sbatch scripts read (slurm/lib.sh), over the pipeline's `env`."""
    env = {
        **cfg.env,
        "RELRET_ROOT": str(REPO),
        "RELRET_PYTHON": python_of(cfg),
        "RELRET_MAX_RESTARTS": str(cfg.max_restarts),
        "RELRET_TRAIN_SCRIPT": str(train_script(cfg)),
    }
    if cfg.stages[name].kind == "command":
        env["RELRET_STATUS_DIR"] = str(cfg.run_dir(name))
    return env


def check_inputs(cfg: PipelineConfig, local: bool = False) -> None:
    """Refuse, before anything is submitted, what would only fail later inside a job."""
    problems = []
    enabled = [n for n in cfg.order() if cfg.stages[n].enabled]
    if any(cfg.stages[n].kind == "train" for n in enabled) and not train_script(cfg).is_file():
        problems.append(f"train_script: {train_script(cfg)} does not exist")
    for name in enabled:
        stage = cfg.stages[name]
        if not cfg.script(name).is_file():
            problems.append(f"stages.{name}.script: {cfg.script(name)} does not exist")
        config_file = cfg.train_config(name) if stage.kind == "train" else None
        if config_file is not None and not config_file.is_file():
            where = (
                f"{stage.config} does not exist"
                if Path(stage.config).expanduser().is_absolute()
                else f"{stage.config} is neither in {Path.cwd()} nor in the repository {REPO}"
            )
            problems.append(f"stages.{name}.config: {where}")
        parent = stage.init_from
        if parent and not cfg.stages[parent].enabled and not is_completed(cfg.run_dir(parent)):
            problems.append(
                f"stages.{name}.init_from: stage {parent!r} is disabled but {cfg.run_dir(parent)} holds no completed "
                f"run; enable it or point stages.{parent}.run_dir at a finished run"
            )
        args = stage_args(cfg, name)  # placeholders
        if config_file is not None and config_file.is_file() and uses_relret_training(cfg):
            config_problems = _training_config_problems(name, args)
            problems += config_problems
            if not config_problems:
                ranks = cfg.local_ranks if local else _ranks(cfg, name)
                problems += shard_problems(name, training_config(cfg, name), ranks)
    if problems:
        raise ConfigError("the pipeline cannot start:\n  " + "\n  ".join(problems))


def _ranks(cfg: PipelineConfig, name: str) -> int:
    """Training processes of a stage: nodes x GPUs (or tasks) per node on SLURM."""
    res = cfg.stage_resources(name)
    return (res.nodes or 1) * (res.gpus_per_node or res.ntasks_per_node or 1)


def uses_relret_training(cfg: PipelineConfig) -> bool:
    """Whether the training stages run relret/train.py, whose config the launcher can check (another train_script,
    such as the tests' probe, takes its own arguments)."""
    return train_script(cfg).resolve() == (REPO / "relret" / "train.py").resolve()


def _training_config_problems(name: str, args: list[str]) -> list[str]:
    """Load a training stage's config with its overrides exactly as relret/train.py will (relret.config, torch-free),
    so that a typo fails here, naming the stage and the key, instead of after a queue wait."""
    config, overrides = args[1], args[4:]
    if overrides[:1] == ["--init-from"]:
        overrides = overrides[2:]
    try:
        train_cfg = load_config(TrainConfig, config, overrides)
    except ConfigError as exc:
        return [f"stages.{name}: its training config does not load ({config} with its overrides): {exc}"]
    return changed_config_problems(name, Path(args[3]), train_cfg)


def shard_problems(name: str, train_cfg: TrainConfig, ranks: int) -> list[str]:
    """What would stop a training stage at its start, read from the manifests of its shard directories that exist
    already (a pipeline submitted again, or shards built beforehand): fewer shards than readers (ranks x
    data.num_workers), or Sentence-BERT vectors of another dimension than data.sbert_dim. Directories that do not
    exist yet (written by an earlier stage) and remote ones are checked by the training itself."""
    problems, n_shards, known = [], 0, True
    for source in train_cfg.data.train:
        manifest = Path(source.path) / "manifest.json"
        if "://" in source.path or not manifest.is_file():
            known = False
            continue
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = False
            continue
        n_shards += sum(1 for shard in data.get("shards", []) if shard.get("samples", 0) > 0)
        dim = data.get("sbert_dim")
        if dim is not None and dim != train_cfg.data.sbert_dim:
            problems.append(
                f"stages.{name}: data.sbert_dim={train_cfg.data.sbert_dim} but {source.path} holds {dim}-dimensional "
                f"Sentence-BERT vectors ({data.get('sbert_model')}); set data.sbert_dim={dim} or rebuild the shards"
            )
    readers = ranks * max(1, train_cfg.data.num_workers)
    if known and train_cfg.data.train and n_shards < readers:
        problems.append(
            f"stages.{name}: {n_shards} training shard(s) for {ranks} rank(s) x {max(1, train_cfg.data.num_workers)} "
            f"worker(s) = {readers} readers, and every reader needs shards of its own: give the stage fewer GPUs, "
            "lower data.num_workers, or rebuild the shards smaller (shards/build.py --samples-per-shard)"
        )
    return problems


def training_config(cfg: PipelineConfig, name: str) -> TrainConfig | None:
    """A training stage's resolved config as relret/train.py will load it (None for other stages, and for another
    train_script)."""
    if cfg.stages[name].kind != "train" or not uses_relret_training(cfg):
        return None
    args = stage_args(cfg, name)
    overrides = args[4:]
    if overrides[:1] == ["--init-from"]:
        overrides = overrides[2:]
    return load_config(TrainConfig, args[1], overrides)


def plan_text(cfg: PipelineConfig) -> str:
    """The dry run's summary: jobs per stage template and the estimated GPU-hours (launcher/grid.py)."""
    order = [n for n in cfg.order() if cfg.stages[n].enabled]

    def gpus(name: str) -> int:
        res = cfg.stage_resources(name)
        return (res.nodes or 1) * (res.gpus_per_node or 0)

    costs = grid.estimate(order, gpus, lambda n: training_config(cfg, n), cfg.expanded_from, cfg.estimate)
    completed = {n for n in order if is_completed(cfg.run_dir(n))}
    kinds = {n: cfg.stages[n].kind for n in order}
    return grid.format_plan(order, cfg.expanded_from, kinds, costs, completed, cfg.estimate)


def sbatch_args(cfg: PipelineConfig, name: str, dependencies: list[str]) -> list[str]:
    """sbatch's options and arguments for one stage (without --parsable)."""
    root = absolute(cfg.run_root)
    args = [
        f"--job-name=relret-{name}",
        f"--output={root / 'logs' / f'{name}-%j.log'}",
        "--export=ALL",
        "--kill-on-invalid-dep=yes",
    ]
    if dependencies:
        args.append("--dependency=afterok:" + ":".join(dependencies))
    args += cfg.stage_resources(name).sbatch_args()
    return [*args, str(cfg.script(name)), *stage_args(cfg, name)]


# ---------------------------------------------------------------------------------------------------------------------
# SLURM


def submit_pipeline(
    cfg: PipelineConfig,
    source: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    out: Print = print,
) -> dict[str, str]:
    """Submit every enabled stage that is neither completed nor still queued; returns {stage: job id} for the stages
    whose jobs are queued or running after this call (new and kept). `source` (config path, overrides) is recorded."""
    check_inputs(cfg)
    if not dry_run:
        slurm.require_slurm()
    root = absolute(cfg.run_root)
    if not dry_run:
        (root / "logs").mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if dry_run else locked(root):
        state = read_state(root)
        state.update(source=dict(source or {}), config=to_dict(cfg))
        jobs: dict[str, str] = {}
        for name in cfg.order():
            stage = cfg.stages[name]
            run_dir = cfg.run_dir(name)
            record = state["stages"].setdefault(name, {"job_ids": []})
            record.update(run_dir=str(run_dir), kind=stage.kind, enabled=stage.enabled)
            if not stage.enabled:
                out(f"{name:<20} disabled")
                continue
            if is_completed(run_dir):
                out(f"{name:<20} completed ({run_dir}); not submitted again")
                continue
            previous = record.get("job_id")
            if previous and (not dry_run or shutil.which("scontrol")):
                info = slurm.job_info(previous)
                if info.active:
                    jobs[name] = previous
                    out(f"{name:<20} job {previous} is still {info.state}; not submitted again")
                    continue
            dependencies = [jobs[p] for p in stage.parents if p in jobs]
            args = sbatch_args(cfg, name, dependencies)
            if dry_run:
                jobs[name] = f"<{name}>"
                out(f"{name:<20} sbatch {shlex.join(args)}")
                continue
            job_id = slurm.sbatch(args, env={**os.environ, **stage_env(cfg, name)})
            jobs[name] = job_id
            record.update(job_id=job_id, submitted=now(), sbatch=args, log=str(root / "logs" / f"{name}-{job_id}.log"))
            record["job_ids"].append(job_id)
            write_json_atomic(root / STATE_FILE, state)  # after every job, so that no job id is ever lost
            after = f" after {', '.join(dependencies)}" if dependencies else ""
            out(f"{name:<20} submitted job {job_id}{after}; log {record['log']}")
        if not dry_run:
            write_json_atomic(root / STATE_FILE, state)
    if dry_run:
        out("")
        out(plan_text(cfg))
    if jobs and not dry_run:
        first_log = state["stages"][next(iter(jobs))]["log"]
        out("")
        out("Follow the jobs with:")
        out(f"  squeue -j {','.join(jobs.values())}")
        out(f"  tail -f {first_log}")
        out(f"  {python_of(cfg)} -m launcher status {root}")
    elif not dry_run:
        out("Nothing to submit: every enabled stage is completed.")
    return jobs


def cancel_pipeline(root: Path, out: Print = print) -> list[str]:
    """scancel every job of the pipeline that is still pending or running; returns their ids."""
    slurm.require_slurm()
    state = read_state(root)
    active = [
        record["job_id"]
        for record in state["stages"].values()
        if record.get("job_id") and slurm.job_info(record["job_id"]).active
    ]
    slurm.scancel(active)
    out(f"cancelled {', '.join(active)}" if active else "no job of this pipeline is pending or running")
    return active


# ---------------------------------------------------------------------------------------------------------------------
# Local mode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher(cfg: PipelineConfig) -> str:
    beside = Path(python_of(cfg)).parent / "deepspeed"
    exe = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if exe is None:
        raise RuntimeError(f"the deepspeed launcher is not installed beside {python_of(cfg)} nor on PATH")
    return exe


def local_command(cfg: PipelineConfig, name: str) -> list[str]:
    """What a stage runs in local mode: training on `local_ranks` processes through the deepspeed launcher."""
    if cfg.stages[name].kind == "command":
        return stage_args(cfg, name)
    launch = [deepspeed_launcher(cfg), "--num_gpus", str(cfg.local_ranks), "--master_addr", "127.0.0.1"]
    return [*launch, "--master_port", str(_free_port()), str(train_script(cfg)), *stage_args(cfg, name)]


def local_env(cfg: PipelineConfig) -> dict[str, str]:
    env = {**os.environ, **cfg.env}
    env.setdefault("OMP_NUM_THREADS", "1")  # several ranks on few cores: one thread each is faster
    # One machine: the ranks meet through a file (relret.distributed), so no rendezvous server listens on any port.
    env.setdefault("RELRET_RENDEZVOUS_DIR", str(absolute(cfg.run_root) / ".rendezvous"))
    if "DS_ACCELERATOR" not in env and shutil.which("nvidia-smi") is None:
        env["DS_ACCELERATOR"] = "cpu"  # no GPU here: DeepSpeed's CPU accelerator with gloo
    return env


def _write_command_status(run_dir: Path, state: str, exit_code: int | None, pid: int | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {"kind": "command", "exit_code": exit_code}
    if pid is not None:
        fields["pid"] = pid
    run_contract.write_status(run_dir, state, **fields)


def _print_flushed(line: str) -> None:
    print(line, flush=True)  # before the stage's own output, also when stdout is a pipe or a log file


def run_local(cfg: PipelineConfig, out: Print = _print_flushed) -> int:
    """Run the enabled stages one after another here; skips completed ones. Returns 0, or the failing exit code."""
    check_inputs(cfg, local=True)
    root = absolute(cfg.run_root)
    root.mkdir(parents=True, exist_ok=True)
    env = local_env(cfg)
    with locked(root):
        for name in cfg.order():
            stage = cfg.stages[name]
            run_dir = cfg.run_dir(name)
            if not stage.enabled:
                out(f"[{name}] disabled")
                continue
            if is_completed(run_dir):
                out(f"[{name}] completed in {run_dir}; skipped")
                continue
            command = local_command(cfg, name)
            out(f"[{name}] {shlex.join(command)}")
            if stage.kind == "command":
                _write_command_status(run_dir, "running", None)
            rc = subprocess.run(command, env=env).returncode
            if stage.kind == "command":
                _write_command_status(run_dir, "completed" if rc == 0 else "failed", rc)
            if rc == INTERRUPTED:
                out(f"[{name}] interrupted after a checkpoint; run the same command again to resume")
                return rc
            if rc != 0:
                out(
                    f"[{name}] failed with exit code {rc}; the stages after it were not run. After fixing the cause, "
                    "run the same command again: completed stages are skipped and training resumes from its checkpoint"
                )
                return rc
            out(f"[{name}] completed")
    return 0
