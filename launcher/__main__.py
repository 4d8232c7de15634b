"""`python -m launcher <command>`: submit the pipeline to SLURM (or run it here), and report on it.

python -m launcher pipeline --config configs/pipeline.yaml [--local] [--dry-run] [dotted.key=value ...]
python -m launcher status RUN_ROOT [--json]
python -m launcher cancel RUN_ROOT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.config import load_pipeline
from launcher.pipeline import cancel_pipeline, run_local, submit_pipeline
from launcher.slurm import SlurmError
from launcher.status import format_table, pipeline_status, to_json
from relret.config import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pipe = sub.add_parser("pipeline", help="submit the stages with afterok dependencies (or run them here: --local)")
    pipe.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/pipeline.yaml")
    pipe.add_argument("--local", action="store_true", help="run the stages one after another on this machine")
    pipe.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    pipe.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. resources.partition=gpu")
    status = sub.add_parser("status", help="each stage's state from SLURM and from its run directory")
    status.add_argument("run_root", type=Path)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    cancel = sub.add_parser("cancel", help="scancel the pipeline's pending and running jobs")
    cancel.add_argument("run_root", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "pipeline":
            cfg = load_pipeline(args.config, args.overrides)
            if args.local:
                return run_local(cfg)
            submit_pipeline(cfg, {"config": args.config, "overrides": args.overrides}, dry_run=args.dry_run)
        elif args.command == "status":
            rows = pipeline_status(args.run_root.resolve())
            print(to_json(rows) if args.json else format_table(rows))
        elif args.command == "cancel":
            cancel_pipeline(args.run_root.resolve())
    except (ConfigError, SlurmError, RuntimeError) as exc:
        print(f"launcher: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
