from pathlib import Path

import pytest

from relret.distributed import RENDEZVOUS_DIR_VAR, DistInfo, read_world


def test_no_launcher_is_a_world_of_one():
    """No RANK/WORLD_SIZE and no srun step: one process, no process group."""
    assert read_world({"PATH": "/bin", "SLURM_JOB_ID": "5", "SLURM_PROCID": "0"}) == DistInfo()


def test_torch_launcher_variables():
    """deepspeed/torchrun variables give rank, local rank and world size."""
    assert read_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistInfo(3, 1, 4, "torch")


def test_srun_step_variables():
    """Inside an srun step the SLURM task variables describe the world; launcher variables take precedence."""
    env = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "9"}
    assert read_world(env) == DistInfo(2, 0, 4, "slurm")
    assert read_world(env | {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).source == "torch"


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "0"}, "half-set distributed environment: RANK set but WORLD_SIZE, LOCAL_RANK missing"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK missing"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "lacks SLURM_LOCALID"),
    ],
)
def test_half_set_environment_is_refused(env, match):
    """A half-set or inconsistent environment raises instead of silently training on a subset."""
    with pytest.raises(RuntimeError, match=match):
        read_world(env)


def test_rendezvous_choices():
    """A world of one gets a private file store, RELRET_RENDEZVOUS_DIR a shared file named after the job, else env://."""
    from relret.distributed import cleanup_distributed, rendezvous

    single = rendezvous(DistInfo(), {})
    assert single.startswith("file://") and "relret-pg-" in single
    cleanup_distributed()  # removes the temporary directory
    env = {"MASTER_ADDR": "n1", "MASTER_PORT": "2345", "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
    shared = rendezvous(DistInfo(0, 0, 2, "slurm"), env | {"RELRET_RENDEZVOUS_DIR": "/tmp/rdv"})
    assert shared == "file:///tmp/rdv/rendezvous-n1-2345-7---1"
    cleanup_distributed()
    assert rendezvous(DistInfo(0, 0, 2, "torch"), env) == "env://"


_RANK_CODE = """
import json, os, sys, time, psutil, torch, torch.distributed as dist
from relret import distributed
info = distributed.init_distributed()
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
print(json.dumps({"rank": info.rank, "sum": t.item(), "listening": listening}))
dist.barrier()
distributed.cleanup_distributed()
"""


def test_file_rendezvous_two_processes_listen_on_loopback_at_most(tmp_path):
    """Two processes meet through RELRET_RENDEZVOUS_DIR: the all_reduce is right and no socket of theirs listens
    outside loopback (no TCP store on MASTER_PORT at all)."""
    import json
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_"))}
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1", RELRET_RENDEZVOUS_DIR=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_CODE],
            env=base | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert all(ip.startswith("127.") or ip == "::1" for r in results for ip in r["listening"]), results


def test_rank0_removes_the_shared_rendezvous_file_at_cleanup(tmp_path):
    """A finished run leaves no store file behind (DeepSpeed's cloned groups keep the file store's own clean-up from
    running), so a manual rerun with the same MASTER_PORT does not meet a stale store and fail to connect."""
    from relret.distributed import cleanup_distributed, rendezvous

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", RENDEZVOUS_DIR_VAR: str(tmp_path)}
    for rank in (1, 0):
        path = Path(rendezvous(DistInfo(rank, rank, 2, "torch"), env).removeprefix("file://"))
        path.write_text("store")
        cleanup_distributed()
        assert path.exists() == (rank == 1)  # only rank 0 removes it
