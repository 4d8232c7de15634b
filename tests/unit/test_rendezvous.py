"""The file rendezvous (RELRET_RENDEZVOUS_DIR): a store left by a killed launch never blocks a rerun (issue 16)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit.procs import alive, descendants, free_port

from relret import distributed
from relret.distributed import RENDEZVOUS_DIR_VAR, DistInfo

REPO = Path(__file__).resolve().parents[2]

# Each rank meets the other, writes the all_reduce's result to ready-RANK, then waits for `go` (or is killed then).
_RANK_SCRIPT = """
import sys, time
from pathlib import Path
import torch, torch.distributed as dist
from relret import distributed
info = distributed.init_distributed(timeout_s=60)
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
here = Path(sys.argv[-2])  # deepspeed puts --local_rank=N before the script's own arguments
(here / f"ready-{info.rank}").write_text(str(t.item()))
go = Path(sys.argv[-1])
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
dist.barrier()
distributed.cleanup_distributed()
"""


def _launch_env(rendezvous_dir: Path) -> dict[str, str]:
    prefixes = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "TORCHELASTIC_", "CROSS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env[RENDEZVOUS_DIR_VAR] = str(rendezvous_dir)
    return env


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once, as `kill -9` of a whole job does."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.distributed
def test_rerun_after_sigkill_meets_no_stale_store(tmp_path):
    """A 2-rank deepspeed launch SIGKILLed after its rendezvous leaves its store file; the very same command run again
    completes (the old naming by address and port made it fail with Gloo's "Connection refused") and removes it."""
    script, go, rendezvous_dir = tmp_path / "ranks.py", tmp_path / "go", tmp_path / "rendezvous"
    script.write_text(_RANK_SCRIPT)
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = _launch_env(rendezvous_dir)

    command += [str(script), str(tmp_path / "ranks"), str(go)]
    (tmp_path / "ranks").mkdir()

    def launch(attempt: str) -> subprocess.Popen:
        with open(tmp_path / f"{attempt}.log", "w") as log:
            return subprocess.Popen(command, env=env, stdout=log, stderr=log)

    def log(attempt: str) -> str:
        return (tmp_path / f"{attempt}.log").read_text()[-3000:]

    killed = launch("killed")
    try:
        deadline = time.monotonic() + 90
        while len(list((tmp_path / "ranks").glob("ready-*"))) < 2 and time.monotonic() < deadline:
            assert killed.poll() is None, log("killed")
            time.sleep(0.1)
        assert len(list((tmp_path / "ranks").glob("ready-*"))) == 2, log("killed")
    finally:
        _kill_tree(killed)
    for ready in (tmp_path / "ranks").iterdir():
        ready.unlink()
    stale = [p.name for p in rendezvous_dir.iterdir() if not p.name.endswith(".lock")]
    assert len(stale) == 1, stale  # the killed launch's store is left behind, as after any SIGKILL

    go.touch()
    rerun = launch("rerun")
    try:
        rerun.wait(timeout=90)
    except subprocess.TimeoutExpired:
        _kill_tree(rerun)
        pytest.fail(f"the rerun hung at the rendezvous:\n{log('rerun')}")
    assert rerun.returncode == 0, log("rerun")
    results = {p.name: p.read_text() for p in (tmp_path / "ranks").iterdir()}
    assert results == {"ready-0": "3.0", "ready-1": "3.0"}, log("rerun")
    assert sorted(p.name for p in rendezvous_dir.iterdir()) == []  # the stale store went, and the rerun's own too


def _proc_store(pid: int, start: str, boot: str | None = None) -> str:
    return f"rendezvous-proc-{boot or distributed._boot_id()}-{pid}-{start}-0-127.0.0.1-29500"


def test_only_stores_of_ended_launches_are_removed(tmp_path):
    """The sweep removes a store whose launching process has ended (or whose PID was reused) and no rank holds, and
    keeps those of a living launcher, of living ranks whose launcher died, of another machine, and the caller's own."""
    living = subprocess.Popen(["sleep", "60"])
    ended = subprocess.Popen(["true"])
    ended.wait()
    try:
        start = distributed._start_ticks(living.pid)
        names = {
            "living launcher": _proc_store(living.pid, start),
            "ended launcher": _proc_store(ended.pid, "1"),
            "reused pid": _proc_store(living.pid, str(int(start) - 1)),
            "ranks alive": _proc_store(ended.pid, "2"),
            "other machine": _proc_store(ended.pid, "1", boot="0" * 32),
            "own": _proc_store(ended.pid, "3"),
        }
        for name in names.values():
            (tmp_path / name).write_text("store")
            (tmp_path / f"{name}.lock").touch()
        (tmp_path / names["ended launcher"]).unlink()  # killed between taking its lock and making its store
        held = os.open(tmp_path / f"{names['ranks alive']}.lock", os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_SH)  # as a rank that outlived its launcher holds it
        try:
            removed = distributed._remove_stale_stores(tmp_path, {}, own=names["own"])
        finally:
            os.close(held)
    finally:
        living.kill()
        living.wait()
    gone = [names["ended launcher"], names["reused pid"]]
    assert sorted(removed) == sorted(gone)
    kept = {name + suffix for name in names.values() if name not in gone for suffix in ("", ".lock")}
    assert not (tmp_path / f"{names['ended launcher']}.lock").exists()
    assert {p.name for p in tmp_path.iterdir()} == kept


def test_slurm_stores_of_earlier_runs_of_the_job_are_removed(tmp_path):
    """Under SLURM only stores of this job's earlier runs (a lower restart count) go: other jobs and steps stay."""
    names = [
        "rendezvous-n1-2345-7-0--",  # job 7, first run
        "rendezvous-n1-2345-7-0-1",  # job 7, restart 1
        "rendezvous-n2-2345-7---2",  # job 7, this run (restart 2), another step
        "rendezvous-n1-2345-17-0-0",  # job 17
    ]
    for name in names:
        (tmp_path / name).write_text("store")
    env = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"}
    removed = distributed._remove_stale_stores(tmp_path, env, own="rendezvous-n1-2345-7-1-2")
    assert sorted(removed) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_every_rank_of_a_launch_names_the_same_store(tmp_path):
    """Ranks started by one process, directly or through a per-rank wrapper shell, name the store after that process;
    a second launch by another process names another store."""
    code = (
        "import os; from relret.distributed import DistInfo, _launch_name;"
        "print(_launch_name(DistInfo(int(os.environ['RANK']), 0, 2, 'torch'), dict(os.environ)))"
    )
    base = _launch_env(tmp_path) | {"WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    base["MASTER_PORT"] = "29500"

    def start(argv: list[str], rank: int | None) -> subprocess.Popen:
        env = base if rank is None else base | {"RANK": str(rank), "LOCAL_RANK": str(rank)}
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)

    rank = [sys.executable, "-c", code]
    procs = [
        start(rank, 0),
        # A shell that stays the rank's parent (it has work after python), as `uv run` or a wrapper script would.
        start(["sh", "-c", '"$0" "$@"; true', *rank], 1),
        # A shell without RANK that starts a rank is a launcher of its own: another launch, another store.
        start(["sh", "-c", 'RANK=0 LOCAL_RANK=0 "$0" "$@"; true', *rank], None),
    ]
    names = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    ours = _proc_store(os.getpid(), distributed._start_ticks(os.getpid()))
    assert names[:2] == [ours, ours]
    assert names[2].startswith("rendezvous-proc-") and names[2] != ours


def test_several_nodes_outside_srun_are_refused():
    """deepspeed or torchrun across nodes with no srun step has no name common to every rank: refused, saying why."""
    env = {"MASTER_ADDR": "n1", "MASTER_PORT": "29500", "LOCAL_SIZE": "8", "SLURM_JOB_ID": "4"}
    with pytest.raises(RuntimeError, match="spans several nodes outside an srun step"):
        distributed._launch_name(DistInfo(0, 0, 16, "torch"), env)
    inside = distributed._launch_name(DistInfo(0, 0, 16, "torch"), env | {"SLURM_STEP_ID": "3"})
    assert inside == "rendezvous-n1-29500-4-3--"
