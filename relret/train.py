"""The training entry point: the dual encoder trained with DeepSpeed over streamed shards.

    deepspeed relret/train.py --config configs/pretrain.yaml --run-dir runs/pretrain [dotted.key=value ...]
    deepspeed relret/train.py --config configs/finetune_clotho.yaml --run-dir runs/clotho --init-from runs/pretrain
    srun python relret/train.py ...          # one task per GPU; relret.distributed reads the SLURM variables
    python relret/train.py --config configs/tiny_cpu.yaml --run-dir runs/tiny       # one CPU process

The run directory is the whole interface (see `relret.checkpoint` and the README): starting again on the same
directory resumes from checkpoints/latest; a completed run exits 0 at once; SIGTERM or SIGUSR1 on any rank makes
every rank write a checkpoint at the next step boundary and exit 75 (rerun to resume); other failures exit 1
(2 for a bad config or data path, before any work), with status.json saying "failed".

One optimizer step: `grad_accum_steps` micro-batches per rank; each micro-batch's loss is computed over the global
micro-batch gathered from every rank (`relret.losses`); DeepSpeed averages the gradients, clips them and steps
AdamW with the warm-up + cosine schedule (`lr_at`). Validation runs after every `val_every_epochs` epochs; the
checkpoint with the best validation mAP@10 is kept beside the newest ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (`deepspeed relret/train.py`): import the package from the repository, not the script's folder
    # (whose modules would shadow top-level ones: data, models, ...).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import base64
import dataclasses
import json
import math
import os
import random
import signal
import time
import traceback
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from relret import checkpoint as ckpt
from relret import distributed
from relret.config import ConfigError, LossConfig, check_choices, dump_yaml, from_dict, load_config, to_dict
from relret.data import DataConfig
from relret.models import ModelConfig

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: "try again"; the launcher requeues and the rerun resumes


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (the authors': 1 epoch linear warm-up, then cosine 2e-5 -> 1e-7)."""

    lr: float = 2e-5
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 1e-7
    """Learning rate of the last step (end of the cosine)."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"optim.lr must be > 0 and optim.min_lr in [0, lr], got {self.lr} and {self.min_lr}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")


@dataclasses.dataclass
class RunConfig:
    """Length, batch, parallelism, precision, checkpoints and logging of a run."""

    epochs: int = 25
    """Training epochs."""
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks (the authors: 32); micro-batch = global / (ranks x accumulation)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step and rank. The loss's batch is one micro-batch gathered over the ranks."""
    zero_stage: Literal[0, 1, 2] = 1
    """DeepSpeed ZeRO stage (3 is not offered: validation runs on uneven per-rank data, which stage 3 cannot)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU. Weights and optimizer state stay float32."""
    seed: int = 0
    """Seed of the model initialisation and of the data order (per epoch: relret.data.epoch_seed)."""
    checkpoint_every_steps: int = 1000
    """Write a checkpoint every this many steps (and always at the end of an epoch)."""
    keep_checkpoints: int = 2
    """Newest step checkpoints kept (the best one is kept in addition)."""
    log_every_steps: int = 1
    """Rank 0 prints and records metrics every this many steps."""
    val_every_epochs: int = 1
    """Validate after every this many epochs (and after the last)."""
    best_metric: str = "t2a/mAP@10"
    """Validation metric that selects checkpoints/best (higher is better)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0 when stderr is a terminal (in log files the one line per step is the progress)."""
    dist_timeout_s: float = 1800.0
    """Timeout of collective operations."""

    def __post_init__(self) -> None:
        check_choices(self, "train")
        for key in ("epochs", "global_batch_size", "grad_accum_steps", "checkpoint_every_steps", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.keep_checkpoints < 1 or self.val_every_epochs < 1:
            raise ConfigError("train.keep_checkpoints and train.val_every_epochs must be >= 1")
        direction, _, metric = self.best_metric.partition("/")
        if direction not in ("t2a", "a2t") or metric not in ("mAP@10", "R@1", "R@5", "R@10"):
            raise ConfigError(
                f"train.best_metric={self.best_metric!r}; expected t2a/ or a2t/ followed by mAP@10, R@1, R@5 or R@10"
            )


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run is: model, data, loss, optimizer, run settings."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The dual encoder."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Shards and streaming."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """The objective over the global batch."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run settings."""
    init_from: str | None = None
    """Checkpoint whose model weights start this run (set by --init-from; resolved to a checkpoint directory)."""


# Keys that may change between the start of a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = (
    "data.num_workers",
    "data.prefetch_factor",
    "data.val_batch_size",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.progress_bar",
    "train.dist_timeout_s",
    "init_from",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring RESUMABLE_CHANGES."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES))


# ---------------------------------------------------------------------------------------------------------------------
# Schedule


def lr_at(update: int, total_updates: int, warmup_updates: int, lr: float, min_lr: float) -> float:
    """Learning rate of optimizer update `update` (0-based): linear warm-up to `lr` over `warmup_updates` updates
    (the first update uses lr / warmup_updates), then a cosine from `lr` down to `min_lr` at the last update."""
    if update < warmup_updates:
        return lr * (update + 1) / warmup_updates
    span = total_updates - warmup_updates - 1
    progress = 1.0 if span <= 0 else min(1.0, (update - warmup_updates) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """`lr_at` as a LambdaLR factor (a callable object, so its settings are saved with the scheduler state)."""

    def __init__(self, total_updates: int, warmup_updates: int, lr: float, min_lr: float) -> None:
        self.total_updates, self.warmup_updates, self.lr, self.min_lr = total_updates, warmup_updates, lr, min_lr

    def __call__(self, update: int) -> float:
        return lr_at(update, self.total_updates, self.warmup_updates, self.lr, self.min_lr) / self.lr


# ---------------------------------------------------------------------------------------------------------------------
# Set-up


@dataclasses.dataclass
class Plan:
    """What the config means for this world: batch split, epoch length, schedule."""

    world_size: int
    micro_batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    samples_per_epoch: int


def make_plan(cfg: TrainConfig, world_size: int, total_train_samples: int) -> Plan:
    from relret.data import steps_per_epoch

    per_micro = world_size * cfg.train.grad_accum_steps
    if cfg.train.global_batch_size % per_micro:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by {world_size} rank(s) x "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}; choose a multiple of {per_micro}"
        )
    samples = cfg.data.samples_per_epoch or total_train_samples
    steps = steps_per_epoch(samples, cfg.train.global_batch_size)
    total = steps * cfg.train.epochs
    warmup = min(total, int(round(cfg.optim.warmup_epochs * steps)))
    return Plan(world_size, cfg.train.global_batch_size // per_micro, steps, total, warmup, samples)


def deepspeed_config(cfg: TrainConfig, plan: Plan, bf16: bool) -> dict[str, Any]:
    o = cfg.optim
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,  # torch's AdamW: no JIT-compiled FusedAdam, same on CPU and GPU
            },
        },
        "zero_optimization": {"stage": cfg.train.zero_stage},
        # bf16 as torch autocast: weights, gradients and optimizer state stay float32 (model.safetensors holds the
        # trained values exactly); DeepSpeed communicates Linear/Conv gradients in bf16.
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def setup_distributed(timeout_s: float) -> tuple[distributed.DistInfo, torch.device]:
    """Process group for the world the environment describes (one is created even for a single process, which
    DeepSpeed needs); returns (info, device)."""
    info = distributed.init_distributed(timeout_s=timeout_s, require_group=True)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return info, device


# ---------------------------------------------------------------------------------------------------------------------
# Logging (rank 0 acts, other ranks hold a do-nothing instance)


class RunLog:
    """Rank 0's step line, metrics.jsonl, TensorBoard, progress bar and status.json."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress_bar: bool, init_from: str | None):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.run_dir, self.total_steps, self.init_from = run_dir, total_steps, init_from
        self._truncate_metrics(start_step)
        self.metrics = open(run_dir / ckpt.METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        # On a terminal the bar sits below the step lines; in a log file the step lines are the progress.
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (progress_bar and sys.stderr.isatty()),
            dynamic_ncols=True,
            desc="train",
            unit="step",
        )
        self._status_time = 0.0

    def _truncate_metrics(self, start_step: int) -> None:
        # A resumed run repeats the steps after its checkpoint: drop what the interrupted run logged for them.
        path = self.run_dir / ckpt.METRICS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line the killed run was writing
                continue
        ckpt.write_text_atomic(path, "".join(line + "\n" for line in kept))

    def print(self, text: str) -> None:
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def record(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        step = record["step"]
        for key, value in record.items():
            if key not in ("step", "epoch", "time", "kind") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def status(self, state: str, step: int, epoch: int, checkpoint: str | None, message: str | None = None) -> None:
        ckpt.write_status(self.run_dir, state, step, epoch, self.total_steps, checkpoint, self.init_from, message)
        self._status_time = time.monotonic()

    def status_every(self, seconds: float, *args) -> None:
        if time.monotonic() - self._status_time >= seconds:
            self.status(*args)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()
        self.metrics.close()


class NullLog:
    """What ranks other than 0 log: nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


# ---------------------------------------------------------------------------------------------------------------------
# Signals


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1; the loop turns it into a checkpoint at the next step boundary on every rank."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            # os.write, not print: the signal may interrupt a print to the same stream (a reentrant call).
            message = (
                f"[rank {distributed.get_rank()}] received {signal.Signals(signum).name}: "
                "checkpointing at the next step boundary\n"
            )
            os.write(sys.stderr.fileno(), message.encode())

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ---------------------------------------------------------------------------------------------------------------------
# RNG state (per rank, in the checkpoint's rank_state/)


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


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    engine,
    run_dir: Path,
    step: int,
    global_state: dict[str, Any],
    rank_state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    is_best: bool,
) -> str:
    """Write checkpoints/<tag> on every rank (collective); `latest` (and `best`) name it once it is complete."""
    import torch.distributed as dist

    rank = distributed.get_rank()
    root = run_dir / ckpt.CHECKPOINTS
    tag = ckpt.tag_for_step(step)
    final = root / tag
    if ckpt.is_complete(final):
        # Already saved at this step (e.g. an interruption right after an epoch-end checkpoint): it is complete and
        # holds the same state; only the pointers may need updating.
        dist.barrier()
    else:
        tmp_tag = ckpt.TMP_PREFIX + tag
        tmp = root / tmp_tag
        if rank == 0:
            ckpt.remove_partial(run_dir)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"relret_step": step}, save_latest=False)
        ckpt.write_json_atomic(tmp / ckpt.RANK_STATE_DIR / f"rank-{rank:05d}.json", rank_state)
        if rank == 0:
            ckpt.save_model_files(tmp, engine.module, config_yaml)
            ckpt.write_json_atomic(tmp / ckpt.STATE_FILE, global_state)  # last: marks the directory complete
        dist.barrier()
        if rank == 0:
            os.replace(tmp, final)
            ckpt.fsync_dir(root)
    if rank == 0:
        if is_best:
            ckpt.write_pointer(run_dir, ckpt.BEST, tag)
        ckpt.write_pointer(run_dir, ckpt.LATEST, tag)
        ckpt.prune(run_dir, keep_last)
    dist.barrier()
    return tag


# ---------------------------------------------------------------------------------------------------------------------
# Validation


def _batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def validate(model, val_sets, cfg: TrainConfig, info, device: torch.device, bf16: bool) -> dict[str, float]:
    """t2a and a2t retrieval metrics over all validation clips (every caption a query); the same on every rank."""
    from relret.evaluate import embed_collection, evaluate_collection

    model.eval()
    try:
        collection = embed_collection(model, val_sets, cfg.data, device, bf16)
    finally:
        model.train()
    result = evaluate_collection(collection, what="validation")
    out = {"val_clips": float(result.info["n_clips"]), "val_captions": float(result.info["n_captions"])}
    for direction, metrics in result.metrics.items():
        out.update({f"{direction}/{name}": value for name, value in metrics.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="relret/train.py", description="Train the PaSST + RoBERTa dual encoder with DeepSpeed."
    )
    p.add_argument("--config", required=True, help="YAML with differences from the defaults (configs/*.yaml)")
    p.add_argument("--run-dir", required=True, help="run directory: checkpoints, logs, status; rerun to resume")
    p.add_argument("--init-from", default=None, help="run or checkpoint directory whose model weights start this run")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, applied after the YAML")
    return p.parse_args(argv)


def _is_main() -> bool:
    return distributed.read_world().rank == 0


def _prepare(args: argparse.Namespace) -> tuple[TrainConfig, Path, Any, Any, Plan, dict | None]:
    """Config, data sources and run-directory checks: everything that can fail cheaply, before any real work."""
    from relret.data import open_train_sources, open_val_sources

    run_dir = Path(args.run_dir).resolve()
    cfg = load_config(TrainConfig, args.config, args.overrides)
    cfg.loss.relevance.resolved()  # a missing calibration file fails now, not at the first step
    tag = ckpt.read_pointer(run_dir, ckpt.LATEST)
    if tag is None and ckpt.step_tags(run_dir):
        # Killed between renaming a complete checkpoint and replacing `latest`: the newest complete one is it.
        tag = ckpt.step_tags(run_dir)[-1]
    resume = {"tag": tag, **ckpt.read_state(run_dir / ckpt.CHECKPOINTS / tag)} if tag is not None else None
    if resume is not None:
        # The run's own checkpoint wins over --init-from, and its config must be the one the run started with.
        saved_cfg_path = run_dir / ckpt.CONFIG_FILE
        saved = from_dict(TrainConfig, _read_yaml(saved_cfg_path))
        diff = config_differences(to_dict(saved), to_dict(cfg))
        if diff:
            raise ConfigError(
                f"run directory {run_dir} was started with another config ({saved_cfg_path}); differing keys: "
                f"{', '.join(diff)}. Use a new --run-dir, or the run's own config"
            )
        cfg.init_from = saved.init_from
    elif args.init_from is not None:
        cfg.init_from = str(ckpt.resolve_checkpoint(args.init_from).resolve())
    weights = cfg.model.audio.weights
    if resume is None and cfg.init_from is None and weights is not None and not Path(weights).is_file():
        raise ConfigError(
            f"model.audio.weights: no file {weights}; download the PaSST checkpoint there (github.com/kkoutini/PaSST"
            "/releases), set model.audio.weights=null for random initialisation, or pass --init-from"
        )
    text = cfg.model.text
    for key, value in (("name_or_path", text.name_or_path), ("tokenizer", text.tokenizer)):
        looks_local = value is not None and value.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(value).expanduser().exists() and not (key == "name_or_path" and text.random_init):
            raise ConfigError(f"model.text.{key}: no directory {value}")
    world = distributed.read_world()
    train_sets = open_train_sources(cfg.data, world.world_size)
    val_sets = open_val_sources(cfg.data)
    plan = make_plan(cfg, world.world_size, sum(s.total_samples for s in train_sets))
    return cfg, run_dir, train_sets, val_sets, plan, resume


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, run_dir, train_sets, val_sets, plan, resume = _prepare(args)
    except (ConfigError, ValueError) as exc:
        print(f"relret/train.py: error: {exc}", file=sys.stderr, flush=True)
        if _is_main():
            try:
                ckpt.write_status(args.run_dir, "failed", 0, 0, 0, None, args.init_from, message=str(exc))
            except OSError:
                pass
        return EXIT_BAD_CONFIG
    if resume is not None and resume.get("completed"):
        if _is_main():
            print(f"run {run_dir} already completed at step {resume['step']} ({resume['tag']}); nothing to do.")
            ckpt.write_status(
                run_dir, "completed", resume["step"], resume["epoch"], plan.total_steps, resume["tag"], cfg.init_from
            )
        return EXIT_COMPLETED
    return _train(cfg, run_dir, train_sets, val_sets, plan, resume)


def _train(cfg: TrainConfig, run_dir: Path, train_sets, val_sets, plan: Plan, resume: dict | None) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    from relret.data import StreamPosition, TrainStream, epoch_seed, make_loader
    from relret.losses import build_loss
    from relret.models import build_model

    stop = StopRequest()
    info, device = setup_distributed(cfg.train.dist_timeout_s)
    is_main = info.rank == 0
    log: RunLog | NullLog = NullLog()
    step, epoch = (resume["step"], resume["epoch"]) if resume else (0, 0)
    latest_tag = resume["tag"] if resume else None
    try:
        config_yaml = dump_yaml(cfg)
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomic(run_dir / ckpt.CONFIG_FILE, config_yaml)
            ckpt.remove_partial(run_dir)
            distributed.print0(f"relret/train.py: run {run_dir}\n{config_yaml}")
        dist.barrier()
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, load_audio_weights=cfg.init_from is None and resume is None)
        if resume is None and cfg.init_from is not None:
            ckpt.load_weights(model, cfg.init_from)
            distributed.print0(f"initialised the model from {cfg.init_from}")
        torch.manual_seed(cfg.train.seed + 1 + info.rank)  # dropout/patchout differ across ranks
        n_params = sum(p.numel() for p in model.parameters())
        ds_config = deepspeed_config(cfg, plan, bf16)
        schedule = WarmupCosine(plan.total_steps, plan.warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False,
        )
        loss_fn = build_loss(cfg.loss)
        needs_all_captions = cfg.loss.name == "listnet" and cfg.loss.relevance.aggregate != "paired"

        positions: dict[int, StreamPosition] = {}
        best = None
        if resume is not None:
            load_path, _ = engine.load_checkpoint(
                str(run_dir / ckpt.CHECKPOINTS), tag=resume["tag"], load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )  # fmt: skip
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {resume['tag']} from {run_dir}")
            rank_file = run_dir / ckpt.CHECKPOINTS / resume["tag"] / ckpt.RANK_STATE_DIR / f"rank-{info.rank:05d}.json"
            best = resume.get("best")
            same_layout = (
                resume.get("world_size") == info.world_size and resume.get("num_workers") == cfg.data.num_workers
            )
            if rank_file.is_file():
                rank_state = json.loads(rank_file.read_text(encoding="utf-8"))
                set_rng_state(rank_state["rng"])
                if same_layout:
                    positions = {int(w): StreamPosition(**p) for w, p in rank_state["positions"].items()}
            if not same_layout and resume["step_in_epoch"] > 0:
                distributed.print0(
                    "WARNING: world size or data.num_workers changed since the checkpoint: the rest of this epoch "
                    "reads a fresh stream (the data order differs from an uninterrupted run)"
                )
            distributed.print0(f"resumed from {resume['tag']} (step {step}, epoch {epoch})")
        elif cfg.init_from is None and cfg.model.audio.weights is None and not cfg.model.text.random_init:
            distributed.print0("note: PaSST starts from random weights (model.audio.weights is null)")
        if not val_sets:
            distributed.print0("note: no validation shards (data.val): checkpoints/best will not be written")

        if is_main:
            log = RunLog(run_dir, plan.total_steps, step, cfg.train.progress_bar, cfg.init_from)
            log.print(
                f"world {info.world_size} | micro-batch {plan.micro_batch_size} x accumulation "
                f"{cfg.train.grad_accum_steps} x ranks = global batch {cfg.train.global_batch_size} | "
                f"{plan.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs = {plan.total_steps} steps | "
                f"{n_params / 1e6:.2f} M parameters | {'bf16 autocast' if bf16 else 'fp32'} on {device.type} | "
                f"ZeRO {cfg.train.zero_stage}"
            )
            log.status("running", step, epoch, latest_tag)

        def checkpoint(step_in_epoch: int, completed: bool = False, is_best: bool = False) -> str:
            global_state = {
                "step": step,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "epoch_seed": epoch_seed(cfg.train.seed, epoch),
                "total_steps": plan.total_steps,
                "world_size": info.world_size,
                "num_workers": cfg.data.num_workers,
                "best": best,
                "init_from": cfg.init_from,
                "completed": completed,
                "damaged_shards": totals["damaged_shards"],
                "bad_samples": totals["bad_samples"],
            }
            rank_state = {
                "rank": info.rank,
                "positions": {str(w): dataclasses.asdict(p) for w, p in positions.items()},
                "rng": rng_state(),
            }
            return save_checkpoint(
                engine, run_dir, step, global_state, rank_state, config_yaml, cfg.train.keep_checkpoints, is_best
            )

        totals = {
            "damaged_shards": resume.get("damaged_shards", 0) if resume else 0,
            "bad_samples": resume.get("bad_samples", 0) if resume else 0,
        }
        accum = cfg.train.grad_accum_steps
        start_in_epoch = resume["step_in_epoch"] if resume else 0
        if start_in_epoch >= plan.steps_per_epoch:  # the checkpoint was the end of an epoch
            epoch, start_in_epoch = epoch + 1, 0
        interrupted = False
        while epoch < cfg.train.epochs and not interrupted:
            stream = TrainStream(
                train_sets,
                cfg.data,
                seed=cfg.train.seed,
                epoch=epoch,
                rank=info.rank,
                world_size=info.world_size,
                batch_size=plan.micro_batch_size,
                batches=plan.steps_per_epoch * accum,
                start=positions if start_in_epoch else None,
            )
            if not start_in_epoch:
                positions = {}
            batches = iter(make_loader(stream, cfg.data, pin_memory=device.type == "cuda"))
            window = {"time": 0.0, "wait": 0.0, "steps": 0}
            for step_in_epoch in range(start_in_epoch + 1, plan.steps_per_epoch + 1):
                t_step = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                sums = torch.zeros(6, dtype=torch.float64, device=device)
                for _ in range(accum):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    window["wait"] += time.perf_counter() - t_wait
                    positions[batch["worker"]] = StreamPosition(batch["batches_done"], batch["raw_pos"])
                    sums[4] += batch["damaged_shards"]
                    sums[5] += batch["bad_samples"]
                    batch = _batch_to(batch, device)
                    audio_emb, text_emb = engine(batch["audio"], batch["audio_len"], batch["captions"])
                    extra = {}
                    if needs_all_captions:
                        extra = {"clip_sbert": batch["clip_sbert"], "caption_mask": batch["caption_mask"]}
                    out = loss_fn(
                        audio_emb.float(), text_emb.float(), batch["caption_sbert"], batch["clip_ids"], **extra
                    )
                    engine.backward(out["loss"])
                    engine.step()
                    sums[0] += out["loss"].detach().double() / accum
                    sums[1] += out.get("loss_t2a", out["loss"]).detach().double() / accum
                    sums[2] += out.get("loss_a2t", out["loss"]).detach().double() / accum
                step += 1
                # One collective per step: mean losses, the stop flag, damage counts.
                sums[3] = 1.0 if stop.requested else 0.0
                dist.all_reduce(sums)
                losses = (sums[:3] / info.world_size).tolist()
                stop_now = sums[3].item() > 0
                totals["damaged_shards"] += int(sums[4].item())
                totals["bad_samples"] += int(sums[5].item())
                window["time"] += time.perf_counter() - t_step
                window["steps"] += 1
                log.advance()
                if step % cfg.train.log_every_steps == 0 or step_in_epoch == plan.steps_per_epoch:
                    rate = window["steps"] * cfg.train.global_batch_size / max(window["time"], 1e-9)
                    wait = window["wait"] / max(window["time"], 1e-9)
                    record = {
                        "kind": "train",
                        "step": step,
                        "epoch": epoch,
                        "loss": losses[0],
                        **{f"loss_{d}": v for d, v in zip(("t2a", "a2t"), losses[1:]) if f"loss_{d}" in out},
                        "lr": lr,
                        "samples_per_s": rate,
                        "data_wait": wait,
                        "damaged_shards": totals["damaged_shards"],
                        "bad_samples": totals["bad_samples"],
                        "time": time.time(),
                    }
                    parts = [f"step {step}/{plan.total_steps}", f"epoch {epoch}", f"loss {losses[0]:.4f}"]
                    parts += [f"{k} {record[k]:.4f}" for k in ("loss_t2a", "loss_a2t") if k in record]
                    parts += [f"lr {lr:.3e}", f"{rate:.1f} samples/s", f"data wait {100 * wait:.1f}%"]
                    if totals["damaged_shards"] or totals["bad_samples"]:
                        parts.append(f"skipped {totals['damaged_shards']} shard reads, {totals['bad_samples']} samples")
                    log.print(" | ".join(parts))
                    log.record(record)
                    window = {"time": 0.0, "wait": 0.0, "steps": 0}
                log.status_every(30.0, "running", step, epoch, latest_tag)
                end_of_epoch = step_in_epoch == plan.steps_per_epoch
                if stop_now and not end_of_epoch:
                    latest_tag = checkpoint(step_in_epoch)
                    interrupted = True
                    break
                if step % cfg.train.checkpoint_every_steps == 0 and not end_of_epoch:
                    latest_tag = checkpoint(step_in_epoch)
                    log.status("running", step, epoch, latest_tag)
            del batches
            if interrupted:
                break
            last_epoch = epoch == cfg.train.epochs - 1
            is_best = False
            if val_sets and ((epoch + 1) % cfg.train.val_every_epochs == 0 or last_epoch):
                t_val = time.perf_counter()
                metrics = validate(engine.module, val_sets, cfg, info, device, bf16)
                value = metrics[cfg.train.best_metric]
                is_best = best is None or value > best["value"]
                if is_best:
                    best = {"metric": cfg.train.best_metric, "value": value, "step": step, "epoch": epoch}
                log.record({"kind": "val", "step": step, "epoch": epoch, **metrics, "time": time.time()})
                log.print(
                    f"validation after epoch {epoch} (step {step}, {time.perf_counter() - t_val:.1f} s): "
                    + " | ".join(f"{k} {metrics[k]:.4f}" for k in ("t2a/mAP@10", "t2a/R@1", "a2t/mAP@10", "a2t/R@1"))
                    + (" (best)" if is_best else "")
                )
            # The epoch-end checkpoint: the data position is "epoch done", so a resume starts the next epoch.
            latest_tag = checkpoint(plan.steps_per_epoch, completed=last_epoch, is_best=is_best)
            epoch += 1
            start_in_epoch = 0
            positions = {}
            log.status("running" if not last_epoch else "completed", step, min(epoch, cfg.train.epochs - 1), latest_tag)
            flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
            dist.all_reduce(flag)
            if flag.item() > 0 and not last_epoch:
                interrupted = True
        if interrupted:
            log.status("interrupted", step, epoch, latest_tag)
            log.print(f"interrupted: checkpoint {latest_tag} written; run again to resume")
            return EXIT_INTERRUPTED
        log.print(f"completed {step} steps; checkpoint {latest_tag}")
        return EXIT_COMPLETED
    except Exception as exc:
        traceback.print_exc()
        if is_main:
            try:
                ckpt.write_status(run_dir, "failed", step, epoch, plan.total_steps, latest_tag, cfg.init_from, str(exc))
            except OSError:
                pass
        return EXIT_FAILED
    finally:
        log.close()
        distributed.cleanup_distributed()


if __name__ == "__main__":
    from relret.train import main as _main  # the package's module, not this script's copy

    sys.exit(_main())
