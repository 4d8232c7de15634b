"""Process-group set-up and the collectives the losses and evaluation need.

One `init_distributed()` / `cleanup_distributed()` pair. The world is read from RANK / WORLD_SIZE / LOCAL_RANK
(deepspeed, torchrun, or set per process) or, inside an `srun` step, from SLURM_PROCID / SLURM_STEP_NUM_TASKS /
SLURM_LOCALID. With neither, the world is one process and no process group is created; every function here then
works unchanged (gathers return their input).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from datetime import timedelta

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


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous(info: DistInfo, env: dict[str, str]) -> str:
    """The init_method of the process group.

    - A world of one: a file store in a fresh temporary directory (nothing listens on any port).
    - RELRET_RENDEZVOUS_DIR set: a file store in that directory, which every node must share (a cluster file
      system; torch's `file://` rendezvous). Nothing listens for the rendezvous, which helps where ad-hoc TCP
      servers are unwelcome (and keeps tests on loopback: torch's TCPStore always binds every interface). The file
      name holds the master address and port, the SLURM job, step and restart count, so reruns never meet a stale one;
      rank 0 removes the file at `cleanup_distributed` (every rank has opened it by then), so that a manual rerun on
      the same port does not find it either.
    - Otherwise `env://`: a TCP store on MASTER_ADDR:MASTER_PORT, as torchrun and the deepspeed launcher expect.
    """
    if info.world_size == 1:
        import tempfile

        directory = tempfile.mkdtemp(prefix="relret-pg-")
        _temp_store_dirs.append(directory)
        return f"file://{directory}/store"
    shared = env.get(RENDEZVOUS_DIR_VAR)
    if shared:
        os.makedirs(shared, exist_ok=True)
        parts = [env["MASTER_ADDR"], env["MASTER_PORT"]]
        parts += [env.get(k, "-") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")]
        path = f"{os.path.abspath(shared)}/rendezvous-{'-'.join(parts)}"
        if info.rank == 0:
            _shared_store_files.append(path)
        return f"file://{path}"
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
