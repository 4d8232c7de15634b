"""The run directory contract: file names, exit codes, the one `status.json` schema and its one writer, atomic writes.

Torch-free (the launcher and `slurm/lib.sh` use it), standard library only.

    DIR/config.yaml         resolved config of the run
    DIR/status.json         `Status` (below), replaced atomically by `write_status`
    DIR/metrics.jsonl       one JSON object per logged step and per validation
    DIR/tb/                 TensorBoard
    DIR/checkpoints/        checkpoints (relret.checkpoint), `latest` and `best` pointers

Exit codes shared by training, the launcher and the SLURM scripts: 0 completed, 1 failed, 2 bad config or input
(before any work), 75 interrupted after a complete checkpoint (rerun to resume).

A status that says "running" is only as good as its writer's liveness: it records the writer's host and PID, and a
training run refreshes `heartbeat` every `HEARTBEAT_S` seconds (`Heartbeat`). `liveness` tells a reader whether
such a status can still be true: the PID is gone on this host, or the heartbeat is older than `STALE_AFTER_S`,
means the run died without saying so (SIGKILL, a lost node, a full disk that refused the "failed" write).

    python -m relret.run_dir write-status DIR --state running --kind command [--exit-code N] [--pid P]
    python -m relret.run_dir show DIR          # the status as JSON, with its liveness
    python -m relret.run_dir step DIR          # the status's step, or -1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
CHECKPOINTS = "checkpoints"

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: "try again"; the launcher requeues and the rerun resumes

STATES = ("running", "interrupted", "completed", "failed")
KINDS = ("train", "command")
HEARTBEAT_S = 30.0
"""How often a running training refreshes its status.json."""
STALE_AFTER_S = 600.0
"""A "running" status whose heartbeat is older than this is taken for dead (20 missed heartbeats: generous enough
for a busy shared file system and a long checkpoint write)."""


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes: the content appears under the final name complete, or not at all


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` (same file system); on success it is renamed to `path` in one step, on
    error removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (best effort; some file systems refuse to open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------------
# Output directories of commands (export, index, evaluate): never replace what the command did not write


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a training run directory (never a place for another command's output)."""
    p = Path(path)
    return (p / CHECKPOINTS).is_dir() or ((p / STATUS_FILE).is_file() and (p / CONFIG_FILE).is_file())


def is_command_stage_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds nothing but the status.json of a command stage: the directory a pipeline (the launcher,
    slurm/lib.sh) made for the command that now writes its output there."""
    p = Path(path)
    if sorted(x.name for x in p.iterdir()) != [STATUS_FILE]:
        return False
    status = read_status(p)
    return status is not None and status.kind == "command"


def check_output_dir(path: str | os.PathLike, is_own: bool, what: str, overwrite: bool = False) -> None:
    """Refuse an output directory that would mix with or replace something the command did not write.

    Fine: absent, an empty directory, a pipeline stage's directory holding only its command status
    (`is_command_stage_dir`), or a previous output of the same command (`is_own`). A file, a training run
    directory, or any other non-empty directory is refused with a ValueError saying what is there and what to do;
    `overwrite` lets the command write its own files into another non-empty directory (never into a run directory,
    and never replacing the directory itself)."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if not p.is_dir():
        raise ValueError(f"--out {p} is a file, not a directory; choose a directory path for the {what}")
    if is_run_dir(p):
        raise ValueError(
            f"--out {p} is a training run directory (it holds {CHECKPOINTS}/ or {STATUS_FILE}); the {what} would mix "
            "with it: choose another --out (--overwrite never writes into a run directory)"
        )
    if is_own or overwrite or not any(p.iterdir()) or is_command_stage_dir(p):
        return
    raise ValueError(
        f"--out {p} exists and is not a previous {what} (it holds {', '.join(sorted(x.name for x in p.iterdir())[:5])}"
        "); choose a new or empty directory, or pass --overwrite to write the command's own files into it"
    )


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `target` to write a command's files into; on success they move into
    `target`: the whole directory in one rename when `target` does not exist, else file by file (each replaced in
    one step), so that files in `target` the command did not write stay untouched. On error nothing moves.

    Callers check `target` with `check_output_dir` first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        if not target.exists():
            os.replace(tmp, target)
        else:
            _move_into(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _move_into(src: Path, dst: Path) -> None:
    """Move every entry of `src` into `dst`, replacing same-named entries one by one (a directory entry is swapped
    with a rename, then the old one removed: it was written by the same command, see `check_output_dir`)."""
    for entry in sorted(src.iterdir()):
        final = dst / entry.name
        if entry.is_dir() and final.is_dir():
            old = dst / f".{entry.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(entry, final)
            shutil.rmtree(old)
        else:
            os.replace(entry, final)


# ---------------------------------------------------------------------------------------------------------------------
# status.json


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class Status:
    """DIR/status.json: one schema for training runs and command stages (fields that do not apply are null)."""

    state: str
    """running | interrupted | completed | failed."""
    kind: str = "train"
    """train (relret/train.py) | command (a pipeline stage running a command: shard, evaluate)."""
    step: int | None = None
    """Optimizer steps done (training)."""
    epoch: int | None = None
    total_steps: int | None = None
    checkpoint: str | None = None
    """The latest complete checkpoint's tag (training)."""
    init_from: str | None = None
    """The checkpoint whose weights started the run (training)."""
    exit_code: int | None = None
    """The command's exit code once it ended (command stages)."""
    message: str | None = None
    """Why it failed, in one line."""
    host: str | None = None
    """Host of the process that wrote the status."""
    pid: int | None = None
    """PID of the process the status speaks for (the training's rank 0, a stage's batch shell)."""
    job_id: str | None = None
    """The SLURM job, when there is one."""
    restarts: int | None = None
    """SLURM_RESTART_COUNT of that job."""
    updated: str | None = None
    """When the state last changed (ISO 8601, UTC)."""
    heartbeat: float | None = None
    """Unix time of the writer's last sign of life (running trainings refresh it)."""

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown run state {self.state!r}; expected one of {', '.join(STATES)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown status kind {self.kind!r}; expected one of {', '.join(KINDS)}")


def write_status(run_dir: str | os.PathLike, state: str, **fields: Any) -> Status:
    """Replace DIR/status.json atomically with a `Status`; the writer's host, PID, SLURM job and time (and, for a
    training, the heartbeat) are filled in unless given."""
    env = os.environ
    kind = fields.get("kind", "train")
    defaults = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": env.get("SLURM_JOB_ID"),
        "restarts": int(env["SLURM_RESTART_COUNT"]) if env.get("SLURM_RESTART_COUNT", "").isdigit() else None,
        "updated": now_iso(),
        "heartbeat": time.time() if kind == "train" else None,
    }
    status = Status(state=state, **{**defaults, **fields})
    write_json_atomic(Path(run_dir) / STATUS_FILE, dataclasses.asdict(status))
    return status


def read_status(run_dir: str | os.PathLike) -> Status | None:
    """DIR/status.json, or None when there is none or it cannot be read (also one written by an older relret, whose
    extra or missing fields are tolerated)."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("state") not in STATES:
        return None
    known = {f.name for f in dataclasses.fields(Status)}
    try:
        return Status(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def liveness(status: Status, now: float | None = None) -> str:
    """For a "running" status: "alive" (its writer still runs, or its heartbeat is recent), "dead" (its PID is gone
    on this host, or no heartbeat for STALE_AFTER_S), or "unknown" (another host and no heartbeat recorded).
    Any other state: "ended"."""
    if status.state != "running":
        return "ended"
    now = time.time() if now is None else now
    here = status.pid is not None and status.host == socket.gethostname()
    if here and not _pid_alive(status.pid):
        return "dead"
    if status.heartbeat is not None:
        return "alive" if now - status.heartbeat < STALE_AFTER_S else "dead"
    return "alive" if here else "unknown"


def describe_dead(status: Status) -> str:
    """Why a "running" status is taken for dead, in one line."""
    if status.pid is not None and status.host == socket.gethostname() and not _pid_alive(status.pid):
        return f"its process {status.pid} on {status.host} is gone without recording an end"
    age = "never" if status.heartbeat is None else f"{time.time() - status.heartbeat:.0f} s ago"
    return f"no heartbeat since {age} (writer {status.pid} on {status.host})"


class Heartbeat:
    """A daemon thread that refreshes a running status's `heartbeat` every `interval_s` seconds, until `stop()` or
    until the status on disk is no longer "running" (another rank recorded a failure)."""

    def __init__(self, run_dir: str | os.PathLike, interval_s: float = HEARTBEAT_S) -> None:
        self.run_dir = Path(run_dir)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="relret-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    @property
    def lock(self) -> threading.Lock:
        """Held while the heartbeat rewrites the file; status writers of the same process take it too."""
        return self._lock

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                status = read_status(self.run_dir)
                if status is None or status.state != "running" or status.pid != os.getpid():
                    return
                try:
                    write_json_atomic(
                        self.run_dir / STATUS_FILE, {**dataclasses.asdict(status), "heartbeat": time.time()}
                    )
                except OSError:  # a full disk: the reader then sees the heartbeat go stale, which is the truth
                    continue

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------------------
# The command line (slurm/lib.sh and the launcher's local mode write command stages' status through it)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relret.run_dir", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-status", help="write DIR/status.json (atomically)")
    write.add_argument("run_dir")
    write.add_argument("--state", required=True, choices=STATES)
    write.add_argument("--kind", default="command", choices=KINDS)
    write.add_argument("--exit-code", type=int, default=None)
    write.add_argument("--pid", type=int, default=None, help="the process the status speaks for (default: this one)")
    write.add_argument("--message", default=None)
    show = sub.add_parser("show", help="print DIR/status.json as JSON with its liveness")
    show.add_argument("run_dir")
    step = sub.add_parser("step", help="print the status's step, or -1 when there is none")
    step.add_argument("run_dir")
    args = parser.parse_args(argv)
    if args.command == "write-status":
        fields: dict[str, Any] = {"kind": args.kind, "exit_code": args.exit_code, "message": args.message}
        if args.pid is not None:
            fields["pid"] = args.pid
        try:
            write_status(args.run_dir, args.state, **fields)
        except OSError as exc:
            print(f"relret.run_dir: cannot write {Path(args.run_dir) / STATUS_FILE}: {exc}", file=sys.stderr)
            return 1
        return 0
    status = read_status(args.run_dir)
    if args.command == "step":
        print(status.step if status is not None and status.step is not None else -1)
        return 0
    if status is None:
        print(f"relret.run_dir: no readable {STATUS_FILE} in {args.run_dir}", file=sys.stderr)
        return 2
    print(json.dumps({**dataclasses.asdict(status), "liveness": liveness(status)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
