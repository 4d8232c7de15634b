"""Process-group set-up and the collectives the losses and evaluation need.

One `init_distributed()` / `cleanup_distributed()` pair. The world is read from RANK / WORLD_SIZE / LOCAL_RANK
(deepspeed, torchrun, or set per process) or, inside an `srun` step, from SLURM_PROCID / SLURM_STEP_NUM_TASKS /
SLURM_LOCALID. With neither, the world is one process and no process group is created; every function here then
works unchanged (gathers return their input).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import subprocess
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the world."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single"
    """"torch" (RANK/WORLD_SIZE/LOCAL_RANK), "slurm" (an srun step) or "single" (no launcher)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env: dict[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def read_world(env: dict[str, str] | None = None) -> DistInfo:
    """The world as the environment describes it; a half-set environment is refused."""
    env = dict(os.environ if env is None else env)
    present = [v for v in _TORCH_VARS if v in env]
    if present:
        missing = [v for v in _TORCH_VARS if v not in env]
        # A launcher that sets RANK and WORLD_SIZE but not LOCAL_RANK (some mpirun set-ups) is still unambiguous on
        # one node; anything else is a half-set environment that would silently train on a subset of the data.
        if missing == ["LOCAL_RANK"] and env.get("WORLD_SIZE") == "1":
            missing = []
            env["LOCAL_RANK"] = "0"
        if missing:
            raise RuntimeError(
                f"half-set distributed environment: {', '.join(present)} set but {', '.join(missing)} missing; "
                "launch with `deepspeed`, `torchrun` or `srun`, or unset them to run a single process"
            )
        info = DistInfo(_int_env(env, "RANK"), _int_env(env, "LOCAL_RANK"), _int_env(env, "WORLD_SIZE"), "torch")
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        missing = [v for v in _SLURM_VARS if v not in env]
        if missing:
            raise RuntimeError(f"SLURM step environment lacks {', '.join(missing)}")
        info = DistInfo(
            _int_env(env, "SLURM_PROCID"),
            _int_env(env, "SLURM_LOCALID"),
            _int_env(env, "SLURM_STEP_NUM_TASKS"),
            "slurm",
        )
    else:
        return DistInfo()
    if not (info.world_size >= 1 and 0 <= info.rank < info.world_size and info.local_rank >= 0):
        raise RuntimeError(f"inconsistent distributed environment: {info}")
    return info


def _slurm_master_addr(env: dict[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise RuntimeError("MASTER_ADDR is not set and no SLURM node list is available to derive it from")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


RENDEZVOUS_DIR_VAR = "RELRET_RENDEZVOUS_DIR"
_temp_store_dirs: list[str] = []
_shared_store_files: list[str] = []
_held_launch_locks: list[int] = []
# A store file named by the launching process: rendezvous-proc-<boot id>-<pid>-<start time>-<elastic restart>-...
_PROC_NAME = re.compile(r"rendezvous-proc-(?P<boot>[0-9a-f]{32})-(?P<pid>\d+)-(?P<start>\d+)-\d+-.+")


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None where no such process runs (a zombie counts as ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def _start_ticks(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot): with the boot id, it tells a process from a later one that reuses
    its PID."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    except OSError:
        import hashlib
        import socket

        return hashlib.md5(socket.gethostname().encode()).hexdigest()


def _launching_process(env: dict[str, str]) -> int:
    """The process that started this rank: the parent, above any per-rank wrapper (a shell script, `uv run`) that
    carries this rank's own RANK, LOCAL_RANK and MASTER_PORT in its environment, as the launcher itself does not."""
    mine = [f"{k}={env.get(k, '')}".encode() for k in ("RANK", "LOCAL_RANK", "MASTER_PORT")]
    pid = os.getppid()
    while pid > 1:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            break
        if not all(m in environ for m in mine):
            break
        fields = _proc_stat(pid)
        if fields is None:
            break
        pid = int(fields[1])
    return pid


def _one_node_launch(info: DistInfo, env: dict[str, str]) -> bool:
    """Whether one launcher process started every rank on this machine: deepspeed (LOCAL_SIZE) or torchrun
    (LOCAL_WORLD_SIZE) with all ranks local, or ranks started by hand with neither (taken to be siblings)."""
    sizes = [env[k] for k in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE") if k in env]
    if sizes:
        return str(info.world_size) in sizes
    return info.source == "torch" and not ("SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env)


def _launch_name(info: DistInfo, env: dict[str, str]) -> str:
    """The store file's name: unique to one launch and the same on each of its ranks, so that a store left behind by a
    killed launch is never joined by a new one (its ranks would wait for, or connect to, the dead ones).

    - One launcher process on this machine (deepspeed or torchrun on one node, or ranks started by hand): that process,
      by boot id, PID and start time, plus torchrun's restart count (torchrun restarts its workers itself).
    - An srun step: the SLURM job, step and restart count (a requeued job counts one more restart).
    """
    elastic = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    where = f"{env['MASTER_ADDR']}-{env['MASTER_PORT']}"
    if _one_node_launch(info, env):
        pid = _launching_process(env)
        start = _start_ticks(pid)
        if start is None:
            raise RuntimeError(f"the process that launched this rank (PID {pid}) has ended; the launch is gone")
        return f"rendezvous-proc-{_boot_id()}-{pid}-{start}-{elastic}-{where}"
    if info.source == "slurm" or ("SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env):
        step = env.get("SLURM_STEP_ID", "-") + (f".{elastic}" if elastic != "0" else "")
        return f"rendezvous-{where}-{env.get('SLURM_JOB_ID', '-')}-{step}-{env.get('SLURM_RESTART_COUNT', '-')}"
    raise RuntimeError(
        f"{RENDEZVOUS_DIR_VAR} is set, but this launch spans several nodes outside an srun step, so nothing names it "
        "on every rank (a store left by an earlier launch could be joined); launch inside `srun` (deepspeed "
        f"--launcher slurm), or unset {RENDEZVOUS_DIR_VAR} to meet through the launcher's TCP store on MASTER_PORT"
    )


def _unused(store: Path) -> bool:
    """Whether no living process holds the shared lock that every rank keeps on `store`'s lock file while it runs
    (the lock file is made before the store, so a store without one was never joined under this scheme)."""
    try:
        fd = os.open(f"{store}.lock", os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove_stale_stores(directory: Path, env: dict[str, str], own: str) -> list[str]:
    """Remove the stores of launches that have ended; return their names.

    A store is stale when its launching process on this machine has ended (or its PID now belongs to a later process)
    and no rank of it still holds its lock, or when it belongs to an earlier run of this SLURM job (a requeued job's
    earlier run has ended on every node). Stores from other machines or other jobs are left alone: their liveness
    cannot be known from here, and they are never joined since their names are their launches' own.
    """
    boot = _boot_id()
    job = env.get("SLURM_JOB_ID")
    restart = int(env.get("SLURM_RESTART_COUNT", "0"))
    earlier_run = re.compile(rf"rendezvous-.+-{re.escape(job)}-(?:[\d.]+|-[\d.]*)-(?P<restart>\d+|-)") if job else None
    removed = []
    # A lock file alone is a launch killed between taking its lock and making its store.
    for name in sorted({path.name.removesuffix(".lock") for path in directory.glob("rendezvous-*")} - {own}):
        store = directory / name
        proc = _PROC_NAME.fullmatch(name)
        if proc:
            ended = proc["boot"] == boot and _start_ticks(int(proc["pid"])) != proc["start"]
        else:
            match = earlier_run.fullmatch(name) if earlier_run else None
            ended = bool(match) and int(match["restart"].replace("-", "0")) < restart
        if ended and _unused(store):
            for path in (store, Path(f"{store}.lock")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(name)
    return removed


def rendezvous(info: DistInfo, env: dict[str, str]) -> str:
    """The init_method of the process group.

    - A world of one: a file store in a fresh temporary directory (nothing listens on any port).
    - RELRET_RENDEZVOUS_DIR set: a file store in that directory, which every node must share (a cluster file
      system; torch's `file://` rendezvous). Nothing listens for the rendezvous, which helps where ad-hoc TCP
      servers are unwelcome (and keeps tests on loopback: torch's TCPStore always binds every interface). The file is
      named by the launch (`_launch_name`: the launching process on one node, else the srun step), never by address
      and port alone, so a rerun never joins a store that a killed launch left (its ranks would connect to dead
      peers: Gloo's "Connection refused"); rank 0 removes stores of ended launches (`_remove_stale_stores`) and, at
      `cleanup_distributed`, its own (every rank has opened it by then).
    - Otherwise `env://`: a TCP store on MASTER_ADDR:MASTER_PORT, as torchrun and the deepspeed launcher expect.
    """
    if info.world_size == 1:
        import tempfile

        directory = tempfile.mkdtemp(prefix="relret-pg-")
        _temp_store_dirs.append(directory)
        return f"file://{directory}/store"
    shared = env.get(RENDEZVOUS_DIR_VAR)
    if shared:
        directory = Path(shared).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        name = _launch_name(info, env)
        # The lock comes before the store: a store whose lock is free belongs to no living rank.
        lock = os.open(directory / f"{name}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(lock, fcntl.LOCK_SH)
        _held_launch_locks.append(lock)
        if info.rank == 0:
            _remove_stale_stores(directory, env, own=name)
            _shared_store_files.extend([f"{directory}/{name}", f"{directory}/{name}.lock"])
        return f"file://{directory}/{name}"
    return "env://"


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0, require_group: bool = False) -> DistInfo:
    """Create the default process group when the world has more than one process (or always, with `require_group`:
    DeepSpeed wants one even for a single process); return this process's place.

    The backend defaults to nccl where CUDA is available and gloo otherwise. RANK / WORLD_SIZE / LOCAL_RANK and
    MASTER_ADDR / MASTER_PORT are exported (also when derived from SLURM, or made up for a world of one) so that
    DeepSpeed finds the same world and does not try MPI discovery.
    """
    info = read_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    if (info.world_size == 1 and not require_group) or (dist.is_available() and dist.is_initialized()):
        return info
    env = os.environ
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    if info.world_size == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_loopback_port()))
    if "MASTER_ADDR" not in env:
        if info.source != "slurm":
            raise RuntimeError("MASTER_ADDR is not set; the launcher (deepspeed, torchrun) normally sets it")
        env["MASTER_ADDR"] = _slurm_master_addr(dict(env))
    if "MASTER_PORT" not in env:
        if info.source != "slurm":
            raise RuntimeError("MASTER_PORT is not set; the launcher (deepspeed, torchrun) normally sets it")
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=rendezvous(info, dict(env)),
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return info


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists (safe to call always, e.g. in `finally`)."""
    import shutil

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        _remove_deepspeed_shm_buffer(rank)
    while _shared_store_files:
        with contextlib.suppress(OSError):
            os.unlink(_shared_store_files.pop())
    while _held_launch_locks:
        os.close(_held_launch_locks.pop())
    while _temp_store_dirs:
        shutil.rmtree(_temp_store_dirs.pop(), ignore_errors=True)


def deepspeed_shm_buffer_name(rank: int, env: dict[str, str] | None = None) -> str:
    """The shared-memory allreduce buffer DeepSpeed's CPU backend creates for `rank` when every rank runs on one machine
    (LOCAL_SIZE equal to the world size, as the deepspeed launcher sets it): 66 MB in /dev/shm per rank."""
    env = os.environ if env is None else env
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def _remove_deepspeed_shm_buffer(rank: int) -> None:
    """DeepSpeed (0.19, ops/csrc/cpu/comm/shm.cpp) never removes that buffer: each run on a new master port left
    132 MB of RAM in /dev/shm (19 GB after a day of runs here, until the machine ran short of memory). Each rank
    removes its own name once the process group is gone; peers that still map it keep their mapping."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", deepspeed_shm_buffer_name(rank)))


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args: object, **kwargs) -> None:
    """print() on rank 0 only, flushed (logs of several ranks are interleaved by the launcher)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def gather_sizes(n_local: int, device: torch.device | None = None) -> list[int]:
    """The first-dimension size on every rank."""
    if get_world_size() == 1:
        return [n_local]
    t = torch.tensor([n_local], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    pad = x.new_zeros((n - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (exact gradients).

    Public collectives only: torch.distributed.nn.functional.all_gather is deprecated in favour of a private API.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked)  # every rank's gradient w.r.t. every slice, summed
        return stacked[dist.get_rank()]


def all_gather_cat(x: torch.Tensor, with_grad: bool, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `x` [n_r, ...] from every rank in rank order -> [sum n_r, ...]; ranks may hold different n_r.

    with_grad=True: autograd-aware; the backward sums every rank's gradient into the local slice, so gradients are
    exact. with_grad=False: the other ranks' slices carry no gradient; the local slice is `x` itself and keeps its.
    """
    world = get_world_size()
    if world == 1:
        return x
    sizes = gather_sizes(x.shape[0], x.device) if sizes is None else sizes
    padded = _pad_rows(x, max(sizes))
    if with_grad:
        parts = list(_AllGatherWithGrad.apply(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.detach().contiguous())
        parts[get_rank()] = padded
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)
