"""The run directory: checkpoints, pointers, status, and loading a trained model without DeepSpeed.

    DIR/config.yaml                      resolved config of the run
    DIR/status.json                      {"state", "step", "epoch", "total_steps", "checkpoint", "init_from", "updated"}
    DIR/metrics.jsonl, DIR/tb/           step and validation metrics (JSON lines, TensorBoard)
    DIR/checkpoints/<tag>/               tag = step-00001234; DeepSpeed state (model, optimizer, scheduler) plus
        model.safetensors                the full model's float32 weights
        config.yaml                      the resolved config
        text_encoder/                    the text model's config.json and tokenizer files (self-contained)
        rank_state/rank-00000.json       per rank: data position of every DataLoader worker, RNG states
        relret_state.json                step, epoch, epoch seed, best metric, ...; written last
    DIR/checkpoints/latest               text file naming the latest complete tag (replaced atomically)
    DIR/checkpoints/best                 text file naming the tag with the best validation mAP@10

A checkpoint is written under checkpoints/.tmp-<tag>/ and renamed to its tag only when every rank has written its
part, and `latest` is replaced after that, so `latest` always names a complete checkpoint.

    model, cfg = load_model("runs/pretrain")        # a run dir (best, else latest) or a checkpoint dir
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from relret.storage import atomic_local_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "relret_state.json"
TEXT_DIR = "text_encoder"
RANK_STATE_DIR = "rank_state"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
TMP_PREFIX = ".tmp-"
STATES = ("running", "interrupted", "completed", "failed")
_TAG_RE = re.compile(r"^step-(\d{8,})$")


def tag_for_step(step: int) -> str:
    return f"step-{step:08d}"


def step_of_tag(tag: str) -> int:
    m = _TAG_RE.match(tag)
    if m is None:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step-NNNNNNNN)")
    return int(m.group(1))


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_local_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def is_complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / STATE_FILE).is_file() and (ckpt_dir / MODEL_FILE).is_file()


def read_pointer(run_dir: str | Path, name: str) -> str | None:
    """The tag `checkpoints/<name>` names, if that checkpoint is complete; else None."""
    path = Path(run_dir) / CHECKPOINTS / name
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag if tag and is_complete(Path(run_dir) / CHECKPOINTS / tag) else None


def write_pointer(run_dir: str | Path, name: str, tag: str) -> None:
    write_text_atomic(Path(run_dir) / CHECKPOINTS / name, tag + "\n")


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text(encoding="utf-8"))


def step_tags(run_dir: str | Path) -> list[str]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name) and is_complete(p)]
    return sorted(tags, key=step_of_tag)


def prune(run_dir: str | Path, keep_last: int) -> list[str]:
    """Delete step checkpoints except the `keep_last` newest and those `latest`/`best` name; returns the deleted."""
    tags = step_tags(run_dir)
    protected = {read_pointer(run_dir, LATEST), read_pointer(run_dir, BEST), *tags[-keep_last:]}
    deleted = [t for t in tags if t not in protected]
    for tag in deleted:
        shutil.rmtree(Path(run_dir) / CHECKPOINTS / tag, ignore_errors=True)
    return deleted


def remove_partial(run_dir: str | Path) -> list[str]:
    """Delete checkpoints/.tmp-* left by a save that never completed (a killed job)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def write_status(
    run_dir: str | Path,
    state: str,
    step: int,
    epoch: int,
    total_steps: int,
    checkpoint: str | None,
    init_from: str | None,
    message: str | None = None,
) -> None:
    """DIR/status.json, replaced atomically."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; expected one of {', '.join(STATES)}")
    data = {
        "state": state,
        "step": step,
        "epoch": epoch,
        "total_steps": total_steps,
        "checkpoint": checkpoint,
        "init_from": init_from,
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if message:
        data["message"] = message
    write_json_atomic(Path(run_dir) / STATUS_FILE, data)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (its best checkpoint, else its latest) or a checkpoint directory."""
    p = Path(path)
    if is_complete(p):
        return p
    if (p / CHECKPOINTS).is_dir():
        tag = read_pointer(p, BEST) or read_pointer(p, LATEST)
        if tag is None:
            raise ValueError(f"run directory {p} has no complete checkpoint yet (checkpoints/best or latest)")
        return p / CHECKPOINTS / tag
    if p.is_dir() and (p / STATE_FILE).is_file():
        raise ValueError(f"checkpoint {p} has no {MODEL_FILE}; it is incomplete or from another program")
    raise ValueError(f"{p} is neither a run directory (with {CHECKPOINTS}/) nor a checkpoint directory ({MODEL_FILE})")


# ---------------------------------------------------------------------------------------------------------------------
# Model files


def save_model_files(ckpt_dir: str | Path, model: torch.nn.Module, config_yaml: str) -> None:
    """model.safetensors (float32), config.yaml and text_encoder/ into a checkpoint directory."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_local_file(ckpt_dir / MODEL_FILE) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "producer": "relret"})
    write_text_atomic(ckpt_dir / CONFIG_FILE, config_yaml)
    text = model.text_encoder
    text.model.config.save_pretrained(str(ckpt_dir / TEXT_DIR))
    text.tokenizer.save_pretrained(str(ckpt_dir / TEXT_DIR))


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load model.safetensors into `model`; every key and shape must match."""
    from safetensors.torch import load_file

    file = Path(ckpt_dir) / MODEL_FILE
    state = load_file(str(file))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{file} does not fit the configured model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}; "
            "the model section of the config must match the checkpoint's config.yaml"
        )
    model.load_state_dict(state, strict=True)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(DualEncoder in eval mode, TrainConfig) from a run or checkpoint directory, without DeepSpeed.

    Everything comes from the checkpoint: the config, the text model's architecture and tokenizer, the weights.
    """
    from transformers import AutoConfig, AutoModel

    from relret.config import load_config
    from relret.models import build_model
    from relret.models.text import load_tokenizer
    from relret.train import TrainConfig

    ckpt = resolve_checkpoint(path)
    cfg = load_config(TrainConfig, ckpt / CONFIG_FILE)
    text_dir = ckpt / TEXT_DIR
    text_model = AutoModel.from_config(AutoConfig.from_pretrained(str(text_dir)), add_pooling_layer=False)
    model = build_model(
        cfg.model, text_model=text_model, tokenizer=load_tokenizer(str(text_dir)), load_audio_weights=False
    )
    load_weights(model, ckpt)
    return model.to(device).eval(), cfg


def describe(path: str | Path) -> dict[str, Any]:
    """The relret state of the checkpoint `path` resolves to, with its directory."""
    ckpt = resolve_checkpoint(path)
    return {"checkpoint": str(ckpt), **read_state(ckpt)}


def fsync_dir(path: Path) -> None:
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
