"""Checkpoints of a run directory: written over registered parts, verified file by file, resumed with fallback.

    DIR/checkpoints/<tag>/               tag = step-00001234
        (DeepSpeed's files)              model, optimizer and scheduler state (the engine part)
        model.safetensors, config.yaml, text_encoder/     the model package (relret.packaging)
        rank_state/rank-00000.json       per rank: its registered per-rank parts (RNG states, stream positions)
        relret_state.json                the global parts (the training state), and the size of every other file
                                         of the checkpoint; written last, so its presence marks the end of a save
    DIR/checkpoints/latest               text file naming the latest complete tag (replaced atomically)
    DIR/checkpoints/best                 text file naming the tag with the best validation metric

A checkpoint is written under checkpoints/.tmp-<tag>/ and renamed to its tag only once every rank has written its
part; `latest` is replaced after that. A checkpoint is complete when relret_state.json reads and every file it lists
has the recorded size (`verify_checkpoint`): a truncated or missing file is noticed, and resuming falls back to the
newest complete checkpoint, saying which one it passed over and why.

    manager = CheckpointManager(run_dir, rank, world_size, keep_last=2)
    manager.register("train", train_state)             # state_dict()/load_state_dict(): JSON, written by rank 0
    manager.register("rng", RngState(), per_rank=True) # one per rank
    manager.register_files("engine", save_fn, load_fn) # parts that write files themselves (DeepSpeed)
    tag = manager.save(step, is_best)                  # collective
    manager.load(resume_point)                         # every registered part back

Loading a trained model without DeepSpeed: `load_model(run_dir_or_checkpoint)`.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import json
import os
import random
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from relret.config import TrainConfig
from relret.packaging import MODEL_FILE, build_from_directory, read_model_config
from relret.run_dir import CHECKPOINTS, CONFIG_FILE, STATUS_FILE, fsync_dir, read_status, write_json_atomic
from relret.run_dir import write_text_atomic as _write_text_atomic

LATEST = "latest"
BEST = "best"
STATE_FILE = "relret_state.json"
RANK_STATE_DIR = "rank_state"
TMP_PREFIX = ".tmp-"
SET_ASIDE_PREFIX = ".incomplete-"
STATE_FORMAT = 2
"""relret_state.json layout: 2 = {"format", "step", "files", "parts"}; a file without "format" is the first layout
(the training state at top level, no file list), which still loads."""
_TAG_RE = re.compile(r"^step-(\d{8,})$")


def tag_for_step(step: int) -> str:
    return f"step-{step:08d}"


def step_of_tag(tag: str) -> int:
    m = _TAG_RE.match(tag)
    if m is None:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step-NNNNNNNN)")
    return int(m.group(1))


def rank_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / RANK_STATE_DIR / f"rank-{rank:05d}.json"


# ---------------------------------------------------------------------------------------------------------------------
# Reading and verifying


class DamagedCheckpoint(ValueError):
    """A checkpoint directory that does not verify; the message says which file and how."""


def _read_state_file(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing (the save never finished)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"{path} cannot be read ({exc}): truncated or corrupt") from None
    if not isinstance(data, dict):
        raise DamagedCheckpoint(f"{path} does not hold a JSON object")
    return data


def verify_checkpoint(ckpt_dir: str | Path) -> list[str]:
    """What is wrong with a checkpoint directory (empty: complete). Every file relret_state.json lists must exist with
    its recorded size; a checkpoint of the first layout (no file list) needs model.safetensors."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return [f"{ckpt_dir} does not exist"]
    try:
        data = _read_state_file(ckpt_dir)
    except DamagedCheckpoint as exc:
        return [str(exc)]
    if "format" not in data:
        return [] if (ckpt_dir / MODEL_FILE).is_file() else [f"{ckpt_dir / MODEL_FILE} is missing"]
    problems = []
    for name, size in data.get("files", {}).items():
        path = ckpt_dir / name
        try:
            actual = path.stat().st_size
        except OSError:
            problems.append(f"{path} is missing")
            continue
        if actual != size:
            problems.append(f"{path} has {actual} bytes where {size} were written: truncated or replaced")
    return problems


def is_complete(ckpt_dir: str | Path) -> bool:
    return not verify_checkpoint(ckpt_dir)


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The training state a complete checkpoint recorded (the "train" part; the whole file in the first layout)."""
    data = _read_state_file(Path(ckpt_dir))
    if "format" not in data:
        return data
    return dict(data.get("parts", {}).get("train", {}))


def _parts_of(ckpt_dir: Path) -> dict[str, Any]:
    data = _read_state_file(ckpt_dir)
    return data.get("parts", {}) if "format" in data else {"train": data}


def _rank_parts_of(ckpt_dir: Path, rank: int) -> dict[str, Any] | None:
    path = rank_file(ckpt_dir, rank)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if "parts" in data:
        return data["parts"]
    # First layout: {"rank", "positions", "rng"}.
    return {"rng": data.get("rng"), "stream": {"positions": data.get("positions", {})}}


def read_pointer(run_dir: str | Path, name: str) -> str | None:
    """The tag `checkpoints/<name>` names, if that checkpoint is complete; else None."""
    tag = pointer_target(run_dir, name)
    return tag if tag and is_complete(Path(run_dir) / CHECKPOINTS / tag) else None


def pointer_target(run_dir: str | Path, name: str) -> str | None:
    """The tag `checkpoints/<name>` names, complete or not (None when there is no pointer)."""
    path = Path(run_dir) / CHECKPOINTS / name
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def write_pointer(run_dir: str | Path, name: str, tag: str) -> None:
    _write_text_atomic(Path(run_dir) / CHECKPOINTS / name, tag + "\n")


def _step_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)), key=lambda p: step_of_tag(p.name)
    )


def step_tags(run_dir: str | Path) -> list[str]:
    """Complete step checkpoints of a run, oldest first."""
    return [p.name for p in _step_dirs(run_dir) if is_complete(p)]


def prune(run_dir: str | Path, keep_last: int) -> list[str]:
    """Delete complete step checkpoints except the `keep_last` newest and those `latest`/`best` name; returns the
    deleted tags. Incomplete checkpoints are never touched here."""
    tags = step_tags(run_dir)
    protected = {read_pointer(run_dir, LATEST), read_pointer(run_dir, BEST), *tags[-keep_last:]}
    deleted = [t for t in tags if t not in protected]
    for tag in deleted:
        shutil.rmtree(Path(run_dir) / CHECKPOINTS / tag, ignore_errors=True)
    return deleted


def remove_partial(run_dir: str | Path) -> list[str]:
    """Delete checkpoints/.tmp-* left by a save that never completed (a killed job; relret wrote them)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def set_aside(ckpt_dir: Path) -> Path:
    """Move an incomplete checkpoint out of the way (kept for inspection, never deleted): checkpoints/.incomplete-
    <tag>-<time>."""
    target = ckpt_dir.with_name(f"{SET_ASIDE_PREFIX}{ckpt_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(ckpt_dir, target)
    return target


# ---------------------------------------------------------------------------------------------------------------------
# Where a run resumes


class NoCheckpointToResume(RuntimeError):
    """A run directory that has checkpointed before holds no complete checkpoint: starting again from step 0 would
    throw its progress away, so it is refused without an explicit restart."""


@dataclasses.dataclass
class ResumePoint:
    """The checkpoint a run resumes from."""

    tag: str
    directory: Path
    state: dict[str, Any]
    """The training state it recorded (the "train" part)."""
    passed_over: list[str]
    """Newer checkpoints that did not verify, with why (also printed)."""


def find_resume_point(run_dir: str | Path) -> ResumePoint | None:
    """The newest complete checkpoint, preferring the one `latest` names; None for a run that never checkpointed.

    A run that has checkpointed before (a `latest` pointer, a checkpoint directory, or a status.json naming a
    checkpoint) but holds no complete checkpoint raises NoCheckpointToResume naming what is missing."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    passed_over: list[str] = []
    latest = pointer_target(run_dir, LATEST)
    candidates = [latest] if latest else []
    candidates += [p.name for p in reversed(_step_dirs(run_dir)) if p.name != latest]
    for tag in candidates:
        problems = verify_checkpoint(root / tag)
        if not problems:
            try:
                return ResumePoint(tag, root / tag, read_state(root / tag), passed_over)
            except DamagedCheckpoint as exc:
                problems = [str(exc)]
        passed_over.append(f"{tag}: {'; '.join(problems)}")
    status = read_status(run_dir)
    evidence = []
    if latest:
        evidence.append(f"{CHECKPOINTS}/{LATEST} names {latest}")
    if status is not None and status.checkpoint:
        evidence.append(f"{STATUS_FILE} says step {status.step}, checkpoint {status.checkpoint}")
    if passed_over or evidence:
        found = "; ".join(passed_over) if passed_over else "no checkpoint directory is left"
        raise NoCheckpointToResume(
            f"run directory {run_dir} has trained before ({'; '.join(evidence) or 'it holds checkpoints'}) but holds "
            f"no complete checkpoint to resume from ({found}). Restore the checkpoint, train in a new --run-dir, or "
            "pass --restart to start this one again from step 0"
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint directory from a run directory (its best checkpoint, else its latest, else its newest
    complete one) or a checkpoint directory; ValueError naming what is wrong otherwise."""
    p = Path(path)
    if (p / STATE_FILE).is_file() or (p / MODEL_FILE).is_file():
        problems = verify_checkpoint(p)
        if problems:
            raise ValueError(f"checkpoint {p} is incomplete or damaged: {'; '.join(problems)}; use another checkpoint")
        return p
    if (p / CHECKPOINTS).is_dir():
        for name in (BEST, LATEST):
            tag = read_pointer(p, name)
            if tag is not None:
                if pointer_target(p, BEST) not in (None, tag):
                    print(
                        f"relret: note: {p}/{CHECKPOINTS}/{BEST} names {pointer_target(p, BEST)}, which is incomplete;"
                        f" using {name} ({tag})",
                        file=sys.stderr,
                    )
                return p / CHECKPOINTS / tag
        tags = step_tags(p)
        if tags:
            return p / CHECKPOINTS / tags[-1]
        raise ValueError(f"run directory {p} has no complete checkpoint yet (checkpoints/best or latest)")
    if p.is_dir() and (p / CONFIG_FILE).is_file() and not (p / MODEL_FILE).is_file():
        raise ValueError(f"checkpoint {p} has no {MODEL_FILE}; it is incomplete or from another program")
    raise ValueError(f"{p} is neither a run directory (with {CHECKPOINTS}/) nor a checkpoint directory ({MODEL_FILE})")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(DualEncoder in eval mode, TrainConfig) from a run or checkpoint directory, without DeepSpeed; everything (the
    config, the text model's architecture and tokenizer, the weights) comes from the checkpoint."""
    ckpt = resolve_checkpoint(path)
    model_cfg, cfg = read_model_config(ckpt)
    if cfg is None:
        raise ValueError(f"{ckpt / CONFIG_FILE} is not a training config; load an export with RetrievalModel")
    return build_from_directory(ckpt, model_cfg, device), cfg


def describe(path: str | Path) -> dict[str, Any]:
    """The relret state of the checkpoint `path` resolves to, with its directory."""
    ckpt = resolve_checkpoint(path)
    return {"checkpoint": str(ckpt), **read_state(ckpt)}


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading registered parts


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class _FilePart:
    save: Callable[[Path, str], None]
    """(checkpoints root, tag) -> writes into root/tag; called on every rank (it decides what each rank writes)."""
    load: Callable[[Path, str], None]


class NoSpaceLeft(RuntimeError):
    """A checkpoint could not be written for want of disk space."""


LOW_SPACE_BYTES = 64 << 20
"""A write that fails while less than this is free on the checkpoint's file system is taken for a full disk."""


def _is_out_of_space(exc: BaseException, root: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    # torch.save inside DeepSpeed reports a full disk as "basic_ios::clear: iostream error" or as "[enforce fail at
    # inline_container.cc] unexpected pos" (RuntimeErrors that do not say why): ask the file system.
    if any(text in str(exc) for text in ("iostream error", "No space left", "unexpected pos")):
        return True
    try:
        return shutil.disk_usage(root).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _release_frames(exc: BaseException | None) -> None:
    """Clear the locals of every frame in `exc`'s traceback and in those of the exceptions it chains, then collect:
    objects that hold open files (torch's zip writer of a failed save) are closed and their disk space given back."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


class CheckpointManager:
    """Saves and loads the registered parts of a training run (see the module docstring). Collective: every rank
    calls `save` and `load`; `barrier` synchronises them (a no-op for one process)."""

    def __init__(
        self,
        run_dir: str | Path,
        rank: int = 0,
        world_size: int = 1,
        keep_last: int = 2,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.barrier = barrier
        self._global: dict[str, Stateful] = {}
        self._per_rank: dict[str, Stateful] = {}
        self._files: dict[str, _FilePart] = {}

    def register(self, name: str, part: Stateful, per_rank: bool = False) -> None:
        """A part whose state is JSON data: the global ones are written by rank 0 into relret_state.json, per-rank
        ones by each rank into rank_state/rank-NNNNN.json."""
        registry = self._per_rank if per_rank else self._global
        if name in self._global or name in self._per_rank or name in self._files:
            raise ValueError(f"checkpoint part {name!r} is already registered")
        registry[name] = part

    def register_files(
        self, name: str, save: Callable[[Path, str], None], load: Callable[[Path, str], None] | None = None
    ) -> None:
        """A part that writes its own files into the checkpoint directory (DeepSpeed's engine, the model package)."""
        if name in self._global or name in self._per_rank or name in self._files:
            raise ValueError(f"checkpoint part {name!r} is already registered")
        self._files[name] = _FilePart(save, load or (lambda root, tag: None))

    # -- save ------------------------------------------------------------------------------------------------------
    def save(self, step: int, is_best: bool = False) -> str:
        """Write checkpoints/<tag> (collective); `latest` (and `best`) name it once it is complete. A checkpoint of
        the same step that is already complete is kept as it is; an incomplete one under the final name is set aside
        first. A full disk raises NoSpaceLeft naming the directory and what to free."""
        tag = tag_for_step(step)
        final = self.root / tag
        try:
            if is_complete(final):
                # Already saved at this step (e.g. an interruption right after an epoch-end checkpoint): it is
                # complete and holds the same state; only the pointers may need updating.
                self.barrier()
            else:
                self._write(tag, final)
            if self.rank == 0:
                if is_best:
                    write_pointer(self.run_dir, BEST, tag)
                write_pointer(self.run_dir, LATEST, tag)
                prune(self.run_dir, self.keep_last)
        except Exception as exc:
            if _is_out_of_space(exc, self.root if self.root.exists() else self.run_dir):
                # The failed writer's open file lives on in the traceback's frames: drop them so that its space is
                # given back, and remove the half-written .tmp-<tag> (ours), so that status.json can still be written.
                _release_frames(exc)
                if self.rank == 0:
                    remove_partial(self.run_dir)
                free = shutil.disk_usage(self.root if self.root.exists() else self.run_dir).free
                raise NoSpaceLeft(
                    f"no space left on the file system of {self.root} (while writing checkpoint {tag}; {free >> 20} MiB "
                    f"free): free space (older runs, {CHECKPOINTS}/{SET_ASIDE_PREFIX}* directories, or lower "
                    "train.keep_checkpoints) and run again: training resumes from the last complete checkpoint"
                ) from exc
            raise
        self.barrier()
        return tag

    def _write(self, tag: str, final: Path) -> None:
        tmp_tag = TMP_PREFIX + tag
        tmp = self.root / tmp_tag
        if self.rank == 0:
            remove_partial(self.run_dir)
            if final.exists():
                moved = set_aside(final)
                print(f"relret: WARNING: {final} was incomplete; moved it to {moved}", file=sys.stderr, flush=True)
            tmp.mkdir(parents=True)
        self.barrier()
        for part in self._files.values():
            part.save(self.root, tmp_tag)
        rank_parts = {name: part.state_dict() for name, part in self._per_rank.items()}
        write_json_atomic(rank_file(tmp, self.rank), {"rank": self.rank, "parts": rank_parts})
        self.barrier()
        if self.rank == 0:
            files = {
                str(p.relative_to(tmp)): p.stat().st_size
                for p in sorted(tmp.rglob("*"))
                if p.is_file() and not p.name.startswith(".") and p.name != STATE_FILE
            }
            state = {
                "format": STATE_FORMAT,
                "step": step_of_tag(tag),
                "files": files,
                "parts": {name: part.state_dict() for name, part in self._global.items()},
            }
            write_json_atomic(tmp / STATE_FILE, state)  # last: marks the directory complete
            os.replace(tmp, final)
            fsync_dir(self.root)

    # -- load ------------------------------------------------------------------------------------------------------
    def load(self, point: ResumePoint) -> list[str]:
        """Every registered part from the checkpoint; returns the per-rank parts this rank found no state for (a
        different world size than the checkpoint's)."""
        for part in self._files.values():
            part.load(self.root, point.tag)
        parts = _parts_of(point.directory)
        for name, part in self._global.items():
            if name in parts:
                part.load_state_dict(parts[name])
        missing = []
        rank_parts = _rank_parts_of(point.directory, self.rank) or {}
        for name, part in self._per_rank.items():
            if rank_parts.get(name) is not None:
                part.load_state_dict(rank_parts[name])
            else:
                missing.append(name)
        return missing


# ---------------------------------------------------------------------------------------------------------------------
# RNG state (a per-rank part)


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    as_tensor = lambda s: torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())  # noqa: E731
    torch.set_rng_state(as_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(as_tensor(state["cuda"]))


class RngState:
    """This process's Python, numpy, torch (and CUDA) generators as a checkpoint part."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def load_train_config_of(ckpt_dir: str | Path) -> TrainConfig:
    """The training config a checkpoint recorded."""
    _, cfg = read_model_config(ckpt_dir)
    if cfg is None:
        raise ValueError(f"{Path(ckpt_dir) / CONFIG_FILE} is not a training config")
    return cfg
