"""Training runs of relret/train.py started by tests: one process, or the real `deepspeed` launcher with 2 CPU ranks
in a private network namespace; each run in a session of its own, so that it is stopped by its process group id."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kit import REPO
from kit.procs import free_port
from relret import checkpoint as ckpt
from relret import run_dir as run_contract
from relret.distributed import deepspeed_shm_buffer_name

TRAIN = REPO / "relret" / "train.py"
TINY = REPO / "configs" / "tiny_cpu.yaml"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
RUN_TIMEOUT_S = 240


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


_STARTED: list[subprocess.Popen] = []


def stop_leftovers() -> None:
    """Whatever a failing test left running is stopped by its process group id (each run has its own session)."""
    for proc in _STARTED:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A process in a session of its own, so that it and everything it starts can be stopped by its group id."""
    out = open(log, "ab")  # noqa: SIM115 (closed with the process in _wait)
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file = out
    _STARTED.append(proc)
    return proc


def _single(run_dir: Path, overrides: list[str], init_from: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(TRAIN), "--config", str(TINY), "--run-dir", str(run_dir), *overrides]
    if init_from is not None:
        cmd[4:4] = ["--init-from", init_from]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return _start(cmd, run_dir.parent / f"{run_dir.name}.log")


def _launcher(run_dir: Path, overrides: list[str], ranks: int = 2) -> subprocess.Popen:
    port = free_port()
    ds = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    ds += [str(TRAIN), "--config", str(TINY), "--run-dir", str(run_dir), *overrides]
    inner = "ip link set lo up && exec " + shlex.join(ds)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = _start(["unshare", "-n", "bash", "-c", inner], run_dir.parent / f"{run_dir.name}.log")
    proc.master_port = port
    return proc


def _shm_buffers(proc: subprocess.Popen, ranks: int = 2) -> list[str]:
    """Which of DeepSpeed's /dev/shm allreduce buffers of a launcher run exist."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(proc.master_port)}
    names = [deepspeed_shm_buffer_name(rank, env) for rank in range(ranks)]
    return [name for name in names if (Path("/dev/shm") / name).exists()]


def _wait(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"run did not finish within {timeout} s (see {proc.log_file.name})")
    finally:
        proc.log_file.close()


def _log(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / run_contract.METRICS_FILE
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == kind]


def _poll(predicate, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}; see {proc.log_file.name}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _last_step(run_dir: Path) -> int:
    try:
        records = _records(run_dir)
    except json.JSONDecodeError:  # a line being written
        return 0
    return records[-1]["step"] if records else 0


def _latest_step(run_dir: Path) -> int:
    tag = ckpt.read_pointer(run_dir, ckpt.LATEST)
    return ckpt.step_of_tag(tag) if tag else 0


def _weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / ckpt.MODEL_FILE))


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / ckpt.STATUS_FILE).read_text())
