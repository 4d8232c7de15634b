"""The training entry point: parses the command line, checks what can be checked cheaply, and runs the Trainer.

    deepspeed relret/train.py --config configs/pretrain.yaml --run-dir runs/pretrain [dotted.key=value ...]
    deepspeed relret/train.py --config configs/finetune_clotho.yaml --run-dir runs/clotho --init-from runs/pretrain
    srun python relret/train.py ...          # one task per GPU; relret.distributed reads the SLURM variables
    python relret/train.py --config configs/tiny_cpu.yaml --run-dir runs/tiny       # one CPU process
    python relret/train.py --config configs/pretrain.yaml --run-dir X --print-config # the resolved config, exit 0

The run directory is the whole interface (relret.run_dir, relret.checkpoint and the README): starting again on the
same directory resumes from its newest complete checkpoint; a completed run exits 0 at once; SIGTERM or SIGUSR1 on
any rank makes every rank write a checkpoint at the next step boundary and exit 75 (rerun to resume); other failures
exit 1 (2 for a bad config, data path or run directory, before any work), with status.json saying "failed". A run
directory that has checkpointed before but holds no complete checkpoint is refused unless --restart is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (`deepspeed relret/train.py`): import the package from the repository, not the script's folder
    # (whose modules would shadow top-level ones: data, models, ...).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import os
from collections.abc import Sequence

from relret import distributed
from relret.config import (
    ConfigError,
    TrainConfig,
    config_differences,
    dump_yaml,
    load_config,
    load_saved_config,
    to_dict,
)
from relret.run_dir import CONFIG_FILE, EXIT_BAD_CONFIG, EXIT_COMPLETED, write_status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="relret/train.py", description="Train the PaSST + RoBERTa dual encoder with DeepSpeed."
    )
    p.add_argument("--config", required=True, help="YAML with differences from the defaults (configs/*.yaml)")
    p.add_argument("--run-dir", required=True, help="run directory: checkpoints, logs, status; rerun to resume")
    p.add_argument("--init-from", default=None, help="run or checkpoint directory whose model weights start this run")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start again from step 0 in a run directory whose checkpoints are gone (refused without this flag)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit (no training)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, applied after the YAML")
    return p.parse_args(argv)


def _is_main() -> bool:
    return distributed.read_world().rank == 0


@dataclasses.dataclass
class Prepared:
    """Everything checked before any process group, model or DeepSpeed work."""

    cfg: TrainConfig
    run_dir: Path
    train_sets: list
    val_sets: list
    plan: object
    resume: object


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The config the arguments describe; the loss is built once so that its own checks run (a calibration file)."""
    cfg = load_config(TrainConfig, args.config, args.overrides)
    from relret.losses import build_loss

    build_loss(cfg.loss)
    return cfg


def prepare(args: argparse.Namespace) -> Prepared:
    """Config, data sources and run-directory checks: everything that can fail cheaply, before any real work."""
    from relret.checkpoint import find_resume_point, resolve_checkpoint
    from relret.data import open_train_sources, open_val_sources
    from relret.trainer import make_plan

    run_dir = Path(args.run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory; name a directory for the run")
    cfg = resolve_config(args)
    resume = None if args.restart else find_resume_point(run_dir)
    if resume is not None:
        # The run's own checkpoint wins over --init-from, and its config must be the one the run started with.
        saved_cfg_path = run_dir / CONFIG_FILE
        saved = load_saved_config(saved_cfg_path)
        diff = config_differences(to_dict(saved), to_dict(cfg))
        if diff:
            raise ConfigError(
                f"run directory {run_dir} was started with another config ({saved_cfg_path}); differing keys: "
                f"{', '.join(diff)}. Use a new --run-dir, or the run's own config"
            )
        cfg.init_from = saved.init_from
    elif args.init_from is not None:
        cfg.init_from = str(resolve_checkpoint(args.init_from).resolve())
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
    return Prepared(cfg, run_dir, train_sets, val_sets, plan, resume)


def main(argv: Sequence[str] | None = None) -> int:
    from relret.checkpoint import NoCheckpointToResume

    args = parse_args(argv)
    if args.print_config:
        try:
            print(dump_yaml(resolve_config(args)), end="")
        except (ConfigError, ValueError) as exc:
            print(f"relret/train.py: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_CONFIG
        return EXIT_COMPLETED
    try:
        prep = prepare(args)
    except (ConfigError, ValueError, NoCheckpointToResume) as exc:
        print(f"relret/train.py: error: {exc}", file=sys.stderr, flush=True)
        if _is_main() and not isinstance(exc, NoCheckpointToResume):  # a refused run keeps the status it had
            try:
                write_status(args.run_dir, "failed", step=0, epoch=0, total_steps=0, init_from=args.init_from,
                             message=str(exc))  # fmt: skip
            except OSError:
                pass
        return EXIT_BAD_CONFIG
    resume = prep.resume
    if resume is not None and resume.state.get("completed"):
        if _is_main():
            print(f"run {prep.run_dir} already completed at step {resume.state['step']} ({resume.tag}); nothing to do.")
            write_status(
                prep.run_dir, "completed", step=resume.state["step"], epoch=resume.state["epoch"],
                total_steps=prep.plan.total_steps, checkpoint=resume.tag, init_from=prep.cfg.init_from,
            )  # fmt: skip
        return EXIT_COMPLETED
    from relret.trainer import Trainer

    trainer = Trainer(prep.cfg, prep.run_dir, prep.plan, prep.train_sets, prep.val_sets, resume, args.restart)
    return trainer.fit()


if __name__ == "__main__":
    from relret.run_dir import EXIT_INTERRUPTED
    from relret.train import main as _main  # the package's module, not this script's copy

    code = _main()
    if code not in (EXIT_COMPLETED, EXIT_INTERRUPTED):
        # Failures leave promptly: the loaders' workers and the process group are gone already; exit now rather than
        # wait for another library's exit hooks.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
