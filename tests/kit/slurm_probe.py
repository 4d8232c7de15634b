"""A stand-in for relret/train.py in the SLURM tests: it exercises the sbatch scripts' launch, signal and requeue
mechanics without training anything (RELRET_TRAIN_SCRIPT points the scripts at it).

    python tests/slurm_probe.py --config CFG --run-dir DIR [--init-from D] [--local_rank=N] [key=value ...]

Every rank appends one JSON line to DIR/probe.jsonl: its rank, local rank, world size, node, CUDA_VISIBLE_DEVICES,
SLURM_RESTART_COUNT and, with `collective=1`, the sum of (rank + 1) over a real gloo all_reduce set up by
relret.distributed.init_distributed. Then, by `mode`:

- `complete`: rank 0 writes status.json {"state": "completed", ...}; exit 0.
- `wait`: once every rank is ready, rank 0 writes DIR/ready-<restart>; every rank waits for SIGUSR1/SIGTERM, records it and exits 75 (the
  training contract's "interrupted after a checkpoint"). From restart `complete_at` on (if given) it completes instead.
- `sleep`: sleeps `sleep_s` seconds, then as `complete`.
- `fail`: exit `exit_code` (default 1); on restarts below `progress_until` (default 0) rank 0 first advances
  status.json's step by 10, as a run that trained for a while before failing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def parse(argv: list[str]) -> tuple[Path, dict[str, str]]:
    run_dir, options = None, {}
    it = iter(argv)
    for arg in it:
        if arg == "--run-dir":
            run_dir = Path(next(it))
        elif arg in ("--config", "--init-from"):
            options[arg[2:]] = next(it)
        elif arg.startswith("--local_rank"):
            continue
        elif "=" in arg:
            key, _, value = arg.partition("=")
            options[key] = value
        else:
            raise SystemExit(f"slurm_probe: unexpected argument {arg!r}")
    if run_dir is None:
        raise SystemExit("slurm_probe: --run-dir is required")
    return run_dir, options


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "status.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def main(argv: list[str]) -> int:
    run_dir, options = parse(argv)
    run_dir.mkdir(parents=True, exist_ok=True)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    caught: list[int] = []

    def on_signal(signum, frame):
        caught.append(signum)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    record = {
        "restart": restart,
        "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "init_from": options.get("init-from"),
        "config": options.get("config"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if options.get("collective") == "1":
        import torch
        import torch.distributed as dist

        from relret.distributed import cleanup_distributed, init_distributed

        info = init_distributed(backend="gloo", timeout_s=60)
        total = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(total)
        record.update(rank=info.rank, local_rank=info.local_rank, world_size=info.world_size, sum=total.item())
        record.update(master_addr=os.environ["MASTER_ADDR"], master_port=os.environ["MASTER_PORT"])
        cleanup_distributed()
    else:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
        record.update(rank=rank)
    with open(run_dir / "probe.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    is_main = record["rank"] == 0

    mode = options.get("mode", "complete")
    if mode == "wait" and restart >= int(options.get("complete_at", sys.maxsize)):
        mode = "complete"
    if mode == "sleep":
        time.sleep(float(options.get("sleep_s", "1")))
        mode = "complete"
    if mode == "complete":
        if is_main:
            write_json(
                run_dir / "status.json", {"state": "completed", "step": 10, "init_from": options.get("init-from")}
            )
        return 0
    if mode == "fail":
        if is_main and restart < int(options.get("progress_until", "0")):
            write_json(run_dir / "status.json", {"state": "failed", "step": read_step(run_dir) + 10})
        return int(options.get("exit_code", "1"))
    if mode != "wait":
        raise SystemExit(f"slurm_probe: unknown mode {mode!r}")
    # Every rank says it is ready (its handlers are installed); rank 0 writes ready-<restart> only when all have, so a
    # test that signals on seeing it never reaches a rank that would still die of the signal's default action.
    (run_dir / f".ready-{restart}-rank{record['rank']}").touch()
    if is_main:
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_STEP_NUM_TASKS", "1")))
        while len(list(run_dir.glob(f".ready-{restart}-rank*"))) < world:
            time.sleep(0.05)
        (run_dir / f"ready-{restart}").touch()
    deadline = time.monotonic() + float(options.get("wait_s", "120"))
    while not caught and time.monotonic() < deadline:
        time.sleep(0.1)
    if not caught:
        return 3
    with open(run_dir / "signals.jsonl", "a", encoding="utf-8") as fh:
        fh.write(
            json.dumps({"restart": restart, "rank": record["rank"], "signal": signal.Signals(caught[0]).name}) + "\n"
        )
    return 75


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
