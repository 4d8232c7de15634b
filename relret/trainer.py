"""The Trainer: the dual encoder trained with DeepSpeed over streamed shards, its state on objects.

    trainer = Trainer(cfg, run_dir, plan, train_sets, val_sets, resume)
    exit_code = trainer.fit()          # the run directory contract: relret.run_dir

One optimizer step (`train_step`): `grad_accum_steps` micro-batches per rank; each micro-batch's loss is computed
over the global micro-batch gathered from every rank (the registered loss, `relret.losses`); DeepSpeed averages the
gradients (loss-scaled in fp16), clips them if optim.grad_clip is set and steps AdamW with the schedule of
`relret.schedule`. The loop logs whatever parts the loss returns. Validation runs after every `val_every_epochs`
epochs; the checkpoint with the best validation metric is kept beside the newest ones. Everything a resume needs is a
registered checkpoint part (`relret.checkpoint`): DeepSpeed's engine, the model package, the `TrainState`, the fp16
loss scaler, and per rank the RNG states and the stream positions.

Signals: SIGTERM or SIGUSR1 on any rank makes every rank stop at the next step boundary after a complete checkpoint
(exit 75). Failures exit 1 on every rank that sees them, with status "failed", after the data loaders' workers are
stopped and the process group is destroyed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from relret import distributed
from relret.checkpoint import CheckpointManager, NoSpaceLeft, ResumePoint, RngState, remove_partial
from relret.config import ConfigError, TrainConfig, dump_yaml
from relret.data import MIN_READS_FOR_DAMAGE_LIMIT, ShardSet, StreamState, UnreadableShards, steps_per_epoch
from relret.run_dir import (
    CHECKPOINTS,
    CONFIG_FILE,
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    METRICS_FILE,
    TB_DIR,
    Heartbeat,
    write_status,
    write_text_atomic,
)
from relret.schedule import WarmupCosine

# ---------------------------------------------------------------------------------------------------------------------
# What the config means for this world


@dataclasses.dataclass
class Plan:
    """What the config means for this world: batch split, epoch length, schedule, precision."""

    world_size: int
    micro_batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    samples_per_epoch: int
    precision: str = "fp32"
    """What train.precision resolves to here: "fp32", "bf16" or "fp16" (autocast dtypes; weights stay float32)."""
    decay_end_steps: int | None = None
    """optim.decay_end_epoch in steps (the cosine's end, then min_lr); None: the cosine ends at the last step."""


def resolve_precision(precision: str, device_type: str) -> str:
    """train.precision on this device: auto is bf16 on CUDA and fp32 elsewhere; fp16 is refused without CUDA."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError(
            f"train.precision=fp16 needs a CUDA GPU (fp16 autocast with loss scaling), but this process runs on "
            f"{device_type}; use train.precision=fp32 or bf16 here"
        )
    return precision


def make_plan(cfg: TrainConfig, world_size: int, total_train_samples: int, device_type: str | None = None) -> Plan:
    """`total_train_samples`: the training sources' samples of one epoch (clips or captions, data.epoch_unit);
    `device_type`: where training runs (default: "cuda" when torch sees a GPU, else "cpu")."""
    per_micro = world_size * cfg.train.grad_accum_steps
    if cfg.train.global_batch_size % per_micro:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by {world_size} rank(s) x "
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}; choose a multiple of {per_micro}"
        )
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.train.precision, device_type)
    samples = cfg.data.samples_per_epoch or total_train_samples
    steps = steps_per_epoch(samples, cfg.train.global_batch_size)
    total = steps * cfg.train.epochs
    warmup = min(total, int(round(cfg.optim.warmup_epochs * steps)))
    end = cfg.optim.decay_end_epoch
    decay_end = None if end is None else int(round(end * steps))
    return Plan(
        world_size, cfg.train.global_batch_size // per_micro, steps, total, warmup, samples, precision, decay_end
    )


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def deepspeed_config(cfg: TrainConfig, plan: Plan, bf16: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, in `plan.precision` (`bf16` True/False: bf16 autocast or fp32 instead, for
    benchmarks and tests).

    Mixed precision is torch autocast inside DeepSpeed ("torch_autocast"), not DeepSpeed's "bf16"/"fp16" engines:
    weights, gradients and optimizer state stay float32 (model.safetensors holds the trained values exactly), and the
    log-mel front end keeps running in float32 (a power spectrum overflows float16). With float16 DeepSpeed adds a
    torch GradScaler (dynamic loss scaling: start 2^16, halve on overflow and skip the step, double after 2000 clean
    steps), as the authors' torch.cuda.amp.GradScaler; with ZeRO stage 0 only (RunConfig refuses 1/2)."""
    o = cfg.optim
    precision = plan.precision if bf16 is None else ("bf16" if bf16 else "fp32")
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": o.grad_clip or 0.0,  # 0.0: DeepSpeed clips nothing
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
        # DeepSpeed communicates Linear/Conv gradients in the autocast dtype.
        "torch_autocast": {
            "enabled": precision in AUTOCAST_DTYPES,
            "dtype": AUTOCAST_DTYPES.get(precision, "bfloat16"),
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


PRECISION_LABELS = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}


def loss_scaler(engine) -> torch.amp.GradScaler | None:
    """The GradScaler DeepSpeed made for fp16 autocast (ZeRO stage 0), or None (bf16, fp32)."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None)


# ---------------------------------------------------------------------------------------------------------------------
# State


@dataclasses.dataclass
class TrainState:
    """Where the run is: the global checkpoint part (relret_state.json's "train")."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    """Steps done in `epoch` (steps_per_epoch: the epoch is done, the next one starts at a resume)."""
    epoch_seed: int = 0
    total_steps: int = 0
    world_size: int = 1
    num_workers: int = 0
    best: dict[str, Any] | None = None
    """{"metric", "value", "step", "epoch"} of the best validation so far."""
    init_from: str | None = None
    completed: bool = False
    damaged_shards: int = 0
    bad_samples: int = 0
    epoch_shard_reads: int = 0
    """Shard reads in this epoch so far (over all ranks), for data.max_damaged_fraction."""
    epoch_damaged_shards: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)


class DamageLimitExceeded(RuntimeError):
    """More of an epoch's shard reads were damaged than data.max_damaged_fraction allows."""


# ---------------------------------------------------------------------------------------------------------------------
# Logging (rank 0 acts, other ranks hold a do-nothing instance)


class RunLog:
    """Rank 0's step line, metrics.jsonl, TensorBoard, progress bar, status.json and its heartbeat."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress_bar: bool, init_from: str | None):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.run_dir, self.total_steps, self.init_from = run_dir, total_steps, init_from
        self._truncate_metrics(start_step)
        self.metrics = open(run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)
        # On a terminal the bar sits below the step lines; in a log file the step lines are the progress.
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (progress_bar and sys.stderr.isatty()),
            dynamic_ncols=True,
            desc="train",
            unit="step",
        )
        self.heartbeat = Heartbeat(run_dir)

    def _truncate_metrics(self, start_step: int) -> None:
        # A resumed run repeats the steps after its checkpoint: drop what the interrupted run logged for them.
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line the killed run was writing
                continue
        write_text_atomic(path, "".join(line + "\n" for line in kept))

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
        with self.heartbeat.lock:
            write_status(
                self.run_dir,
                state,
                step=step,
                epoch=epoch,
                total_steps=self.total_steps,
                checkpoint=checkpoint,
                init_from=self.init_from,
                message=message,
            )
        if state == "running" and not self.heartbeat._thread.is_alive() and not self.heartbeat._stop.is_set():
            self.heartbeat.start()

    def close(self) -> None:
        self.heartbeat.stop()
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
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

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

    def restore(self) -> None:
        """Put back the handlers that were there before (a Trainer run inside another program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------------
# The Trainer


def setup_distributed(timeout_s: float) -> tuple[distributed.DistInfo, torch.device]:
    """Process group for the world the environment describes (one is created even for a single process, which
    DeepSpeed needs); returns (info, device)."""
    info = distributed.init_distributed(timeout_s=timeout_s, require_group=True)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return info, device


@dataclasses.dataclass
class StepResult:
    """One optimizer step, reduced over the ranks."""

    parts: dict[str, float]
    """The loss's parts, averaged over micro-batches and ranks ("loss" first)."""
    lr: float
    stop: bool
    """Some rank was asked to stop."""
    damaged_shards: int
    bad_samples: int
    shard_reads: int
    data_wait_s: float


class Trainer:
    """One training run on this rank (see the module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        plan: Plan,
        train_sets: list[ShardSet],
        val_sets: list[ShardSet],
        resume: ResumePoint | None = None,
        restart: bool = False,
    ) -> None:
        self.cfg, self.run_dir, self.plan = cfg, Path(run_dir), plan
        self.train_sets, self.val_sets = train_sets, val_sets
        self.resume, self.restart = resume, restart
        self.state = TrainState(total_steps=plan.total_steps, num_workers=cfg.data.num_workers, init_from=cfg.init_from)
        self.stream = StreamState()
        self.log: RunLog | NullLog = NullLog()
        self.latest_tag: str | None = resume.tag if resume else None
        self.loaders: list[Any] = []

    # -- set-up ----------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import torch.distributed as dist

        from relret.losses import build_loss
        from relret.models import build_model
        from relret.packaging import load_weights, save_model_files

        cfg, info = self.cfg, self.info
        self.state.world_size = info.world_size
        config_yaml = dump_yaml(cfg)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / CONFIG_FILE, config_yaml)
            remove_partial(self.run_dir)
            if self.restart:
                for pointer in ("latest", "best"):  # they name checkpoints that are gone (the refusal said so)
                    (self.run_dir / CHECKPOINTS / pointer).unlink(missing_ok=True)
            distributed.print0(f"relret/train.py: run {self.run_dir}\n{config_yaml}")
        dist.barrier()
        self.bf16 = self.plan.precision == "bf16"  # validation embeds in bf16 autocast too; fp16 runs validate in fp32

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, load_audio_weights=cfg.init_from is None and self.resume is None)
        if self.resume is None and cfg.init_from is not None:
            load_weights(model, cfg.init_from)
            distributed.print0(f"initialised the model from {cfg.init_from}")
        torch.manual_seed(cfg.train.seed + 1 + info.rank)  # dropout/patchout differ across ranks
        self.n_params = sum(p.numel() for p in model.parameters())
        schedule = WarmupCosine(
            self.plan.total_steps, self.plan.warmup_steps, cfg.optim.lr, cfg.optim.min_lr, self.plan.decay_end_steps
        )
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, self.plan),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False,
        )
        self.loss_fn = build_loss(cfg.loss)
        self.loss_fn.report_targets = self.loss_fn.graded_targets

        engine = self.engine

        def save_engine(root: Path, tag: str) -> None:
            engine.save_checkpoint(str(root), tag=tag, client_state={"relret_step": self.state.step}, save_latest=False)

        def load_engine(root: Path, tag: str) -> None:
            load_path, _ = engine.load_checkpoint(
                str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {root}")

        def save_package(root: Path, tag: str) -> None:
            if self.is_main:
                save_model_files(root / tag, engine.module, config_yaml)

        self.checkpoints = CheckpointManager(
            self.run_dir, info.rank, info.world_size, cfg.train.keep_checkpoints, dist.barrier
        )
        self.checkpoints.register_files("engine", save_engine, load_engine)
        self.checkpoints.register_files("model", save_package)
        self.checkpoints.register("train", self.state)
        scaler = loss_scaler(self.engine)
        if scaler is not None:  # DeepSpeed's checkpoint leaves the GradScaler out; the same on every rank (ZeRO 0)
            self.checkpoints.register("loss_scaler", scaler)
        self.checkpoints.register("rng", RngState(), per_rank=True)
        self.checkpoints.register("stream", self.stream, per_rank=True)

    def _load_resume_point(self) -> None:
        point = self.resume
        for passed in point.passed_over:
            distributed.print0(f"WARNING: checkpoint {passed}; resuming from an older one")
        self.checkpoints.load(point)
        same_layout = (
            self.state.world_size == self.info.world_size and self.state.num_workers == self.cfg.data.num_workers
        )
        if not same_layout:
            self.stream.reset()
            if self.state.step_in_epoch > 0:
                distributed.print0(
                    "WARNING: world size or data.num_workers changed since the checkpoint: the rest of this epoch "
                    "reads a fresh stream (the data order differs from an uninterrupted run)"
                )
        self.state.world_size, self.state.num_workers = self.info.world_size, self.cfg.data.num_workers
        distributed.print0(f"resumed from {point.tag} (step {self.state.step}, epoch {self.state.epoch})")

    # -- one step --------------------------------------------------------------------------------------------------
    def train_step(self, batches) -> StepResult:
        """One optimizer step over `grad_accum_steps` micro-batches from `batches`, reduced over the ranks."""
        import torch.distributed as dist

        lr = self.scheduler.get_last_lr()[0]
        accum = self.cfg.train.grad_accum_steps
        parts: dict[str, torch.Tensor] = {}
        counts = torch.zeros(4, dtype=torch.float64, device=self.device)  # stop flag, damaged, bad, reads
        wait = 0.0
        for _ in range(accum):
            t_wait = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t_wait
            self.stream.advance(batch.info)
            counts[1] += batch.info.damaged_shards
            counts[2] += batch.info.bad_samples
            counts[3] += batch.info.shard_reads
            batch = batch.to(self.device, non_blocking=True)
            audio_emb, text_emb = self.engine(batch.audio, batch.audio_len, batch.captions)
            out = self.loss_fn(audio_emb.float(), text_emb.float(), **self.loss_fn.batch_inputs(batch))
            self.engine.backward(out["loss"])
            self.engine.step()
            for name in ("loss", *(k for k in out if k != "loss")):
                parts[name] = parts.get(name, 0.0) + out[name].detach().double() / accum
        # One collective per step: the loss's parts, the stop flag, the damage counts.
        counts[0] = 1.0 if self.stop.requested else 0.0
        reduced = torch.cat([counts, torch.stack(list(parts.values())).to(counts)])
        dist.all_reduce(reduced)
        values = (reduced[4:] / self.info.world_size).tolist()
        return StepResult(
            parts=dict(zip(parts, values)),
            lr=lr,
            stop=reduced[0].item() > 0,
            damaged_shards=int(reduced[1].item()),
            bad_samples=int(reduced[2].item()),
            shard_reads=int(reduced[3].item()),
            data_wait_s=wait,
        )

    def _check_damage(self) -> None:
        s, limit = self.state, self.cfg.data.max_damaged_fraction
        if s.epoch_shard_reads >= MIN_READS_FOR_DAMAGE_LIMIT and s.epoch_damaged_shards > limit * s.epoch_shard_reads:
            raise DamageLimitExceeded(
                f"{s.epoch_damaged_shards} of {s.epoch_shard_reads} shard reads in epoch {s.epoch} were damaged "
                f"({s.epoch_damaged_shards / s.epoch_shard_reads:.0%}), more than data.max_damaged_fraction="
                f"{limit:g}; training would see a fraction of the data. Check the shards (rebuild them with "
                "shards/build.py, which keeps the intact ones) or raise data.max_damaged_fraction"
            )

    # -- checkpoints and validation --------------------------------------------------------------------------------
    def save(self, step_in_epoch: int, completed: bool = False, is_best: bool = False) -> str:
        from relret.data import epoch_seed

        self.state.step_in_epoch = step_in_epoch
        self.state.epoch_seed = epoch_seed(self.cfg.train.seed, self.state.epoch)
        self.state.completed = completed
        self.latest_tag = self.checkpoints.save(self.state.step, is_best)
        return self.latest_tag

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """t2a and a2t retrieval metrics over all validation clips (every caption a query); the same on every rank."""
        from relret.evaluate import embed_collection, evaluate_collection

        model = self.engine.module
        model.eval()
        try:
            collection = embed_collection(model, self.val_sets, self.cfg.data, self.device, self.bf16)
        finally:
            model.train()
        result = evaluate_collection(collection, what="validation")
        out = {"val_clips": float(result.info["n_clips"]), "val_captions": float(result.info["n_captions"])}
        for direction, metrics in result.metrics.items():
            out.update({f"{direction}/{name}": value for name, value in metrics.items()})
        return out

    # -- the run ---------------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to the end (or to a stop request); returns the exit code (relret.run_dir)."""
        self.stop = StopRequest()
        self.info, self.device = setup_distributed(self.cfg.train.dist_timeout_s)
        self.is_main = self.info.rank == 0
        try:
            self._setup()
            if self.resume is not None:
                self._load_resume_point()
            elif (
                self.cfg.init_from is None
                and self.cfg.model.audio.weights is None
                and not self.cfg.model.text.random_init
            ):
                distributed.print0("note: PaSST starts from random weights (model.audio.weights is null)")
            if not self.val_sets:
                distributed.print0("note: no validation shards (data.val): checkpoints/best will not be written")
            if self.is_main:
                self.log = RunLog(
                    self.run_dir,
                    self.plan.total_steps,
                    self.state.step,
                    self.cfg.train.progress_bar,
                    self.cfg.init_from,
                )
                self.log.print(
                    f"world {self.info.world_size} | micro-batch {self.plan.micro_batch_size} x accumulation "
                    f"{self.cfg.train.grad_accum_steps} x ranks = global batch {self.cfg.train.global_batch_size} | "
                    f"{self.plan.steps_per_epoch} steps/epoch x {self.cfg.train.epochs} epochs = "
                    f"{self.plan.total_steps} steps | {self.n_params / 1e6:.2f} M parameters | "
                    f"{PRECISION_LABELS[self.plan.precision]} on {self.device.type} | ZeRO {self.cfg.train.zero_stage}"
                )
                self.log.status("running", self.state.step, self.state.epoch, self.latest_tag)
            interrupted = self._epochs()
            if interrupted:
                self.log.status("interrupted", self.state.step, self.state.epoch, self.latest_tag)
                self.log.print(f"interrupted: checkpoint {self.latest_tag} written; run again to resume")
                return EXIT_INTERRUPTED
            self.log.print(f"completed {self.state.step} steps; checkpoint {self.latest_tag}")
            return EXIT_COMPLETED
        except Exception as exc:
            known = isinstance(exc, (NoSpaceLeft, UnreadableShards, DamageLimitExceeded))
            if known:
                print(f"relret/train.py: error: [rank {self.info.rank}] {exc}", file=sys.stderr, flush=True)
            else:
                traceback.print_exc()
            self._record_failure(exc)
            return EXIT_FAILED
        finally:
            for loader in self.loaders:
                loader.close()
            self.log.close()
            self.stop.restore()
            distributed.cleanup_distributed()

    def _record_failure(self, exc: Exception) -> None:
        """status.json "failed", written by whichever rank failed (a failure on rank 1 must not leave "running")."""
        message = str(exc) if self.info.world_size == 1 else f"rank {self.info.rank}: {exc}"
        try:
            write_status(
                self.run_dir,
                "failed",
                step=self.state.step,
                epoch=self.state.epoch,
                total_steps=self.plan.total_steps,
                checkpoint=self.latest_tag,
                init_from=self.cfg.init_from,
                message=message,
            )
        except OSError as write_error:  # e.g. a full disk: readers then see the writer gone and the heartbeat stale
            print(f"relret/train.py: could not record the failure in status.json: {write_error}", file=sys.stderr)

    def _epochs(self) -> bool:
        """The epoch loop; returns whether it stopped on a stop request."""
        import torch.distributed as dist

        from relret.data import TrainStream, make_loader

        cfg, plan, state = self.cfg, self.plan, self.state
        accum = cfg.train.grad_accum_steps
        start_in_epoch = state.step_in_epoch
        if start_in_epoch >= plan.steps_per_epoch:  # the checkpoint was the end of an epoch
            state.epoch, start_in_epoch = state.epoch + 1, 0
        while state.epoch < cfg.train.epochs:
            if not start_in_epoch:
                self.stream.reset()
                state.epoch_shard_reads = state.epoch_damaged_shards = 0
            stream = TrainStream(
                self.train_sets,
                cfg.data,
                seed=cfg.train.seed,
                epoch=state.epoch,
                rank=self.info.rank,
                world_size=self.info.world_size,
                batch_size=plan.micro_batch_size,
                batches=plan.steps_per_epoch * accum,
                start=dict(self.stream.positions) if start_in_epoch else None,
            )
            loader = make_loader(stream, cfg.data, pin_memory=self.device.type == "cuda")
            self.loaders.append(loader)
            batches = iter(loader)
            window = {"time": 0.0, "wait": 0.0, "steps": 0}
            interrupted = False
            for step_in_epoch in range(start_in_epoch + 1, plan.steps_per_epoch + 1):
                t_step = time.perf_counter()
                result = self.train_step(batches)
                state.step += 1
                state.damaged_shards += result.damaged_shards
                state.bad_samples += result.bad_samples
                state.epoch_shard_reads += result.shard_reads
                state.epoch_damaged_shards += result.damaged_shards
                window["time"] += time.perf_counter() - t_step
                window["wait"] += result.data_wait_s
                window["steps"] += 1
                self.log.advance()
                end_of_epoch = step_in_epoch == plan.steps_per_epoch
                if state.step % cfg.train.log_every_steps == 0 or end_of_epoch:
                    self._log_step(result, window)
                    window = {"time": 0.0, "wait": 0.0, "steps": 0}
                self._check_damage()
                if self.is_main and time.monotonic() - getattr(self, "_status_time", 0.0) >= 30.0:
                    self.log.status("running", state.step, state.epoch, self.latest_tag)
                    self._status_time = time.monotonic()
                if result.stop and not end_of_epoch:
                    self.save(step_in_epoch)
                    interrupted = True
                    break
                if state.step % cfg.train.checkpoint_every_steps == 0 and not end_of_epoch:
                    self.save(step_in_epoch)
                    self.log.status("running", state.step, state.epoch, self.latest_tag)
            loader.close()
            self.loaders.remove(loader)
            if interrupted:
                return True
            last_epoch = state.epoch == cfg.train.epochs - 1
            is_best = False
            if self.val_sets and ((state.epoch + 1) % cfg.train.val_every_epochs == 0 or last_epoch):
                is_best = self._validate_and_log()
            # The epoch-end checkpoint: the data position is "epoch done", so a resume starts the next epoch.
            self.save(plan.steps_per_epoch, completed=last_epoch, is_best=is_best)
            state.epoch += 1
            start_in_epoch = 0
            self.stream.reset()
            self.log.status(
                "running" if not last_epoch else "completed",
                state.step,
                min(state.epoch, cfg.train.epochs - 1),
                self.latest_tag,
            )
            flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.device)
            dist.all_reduce(flag)
            if flag.item() > 0 and not last_epoch:
                return True
        return False

    def _validate_and_log(self) -> bool:
        state = self.state
        t_val = time.perf_counter()
        metrics = self.validate()
        value = metrics[self.cfg.train.best_metric]
        is_best = state.best is None or value > state.best["value"]
        if is_best:
            state.best = {
                "metric": self.cfg.train.best_metric,
                "value": value,
                "step": state.step,
                "epoch": state.epoch,
            }
        self.log.record({"kind": "val", "step": state.step, "epoch": state.epoch, **metrics, "time": time.time()})
        self.log.print(
            f"validation after epoch {state.epoch} (step {state.step}, {time.perf_counter() - t_val:.1f} s): "
            + " | ".join(f"{k} {metrics[k]:.4f}" for k in ("t2a/mAP@10", "t2a/R@1", "a2t/mAP@10", "a2t/R@1"))
            + (" (best)" if is_best else "")
        )
        return is_best

    def _log_step(self, result: StepResult, window: dict[str, float]) -> None:
        state, cfg = self.state, self.cfg
        rate = window["steps"] * cfg.train.global_batch_size / max(window["time"], 1e-9)
        wait = window["wait"] / max(window["time"], 1e-9)
        record = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            **result.parts,
            "lr": result.lr,
            "samples_per_s": rate,
            "data_wait": wait,
            "damaged_shards": state.damaged_shards,
            "bad_samples": state.bad_samples,
            "time": time.time(),
        }
        line = [f"step {state.step}/{self.plan.total_steps}", f"epoch {state.epoch}"]
        line += [f"{name} {value:.4f}" for name, value in result.parts.items()]
        line += [f"lr {result.lr:.3e}", f"{rate:.1f} samples/s", f"data wait {100 * wait:.1f}%"]
        if state.damaged_shards or state.bad_samples:
            line.append(f"skipped {state.damaged_shards} shard reads, {state.bad_samples} samples")
        self.log.print(" | ".join(line))
        self.log.record(record)
