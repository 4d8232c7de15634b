"""Training throughput: samples/s and data-wait fraction of the tiny CPU model; samples/s per GPU and model FLOP
utilisation (MFU) of full PaSST-S + RoBERTa-large at batch 32 in bf16 where CUDA exists.

    python bench/train.py                          # CPU: tiny_cpu.yaml through relret/train.py; GPU part if CUDA
    python bench/train.py --gpu-only --batch 32    # the full-size model on one GPU
    python bench/train.py --shards DIR             # read existing shards (DIR/{train,val}) instead of synthetic ones

CPU part: runs the real entry point (`python relret/train.py`, one process, DeepSpeed, DataLoader workers) on
synthetic shards (tests/kit/shards.py) and reads its metrics.jsonl: samples/s and the fraction of step time spent
waiting for the next batch, over the steps after the warm-up. Target: data wait under 10%.

GPU part: one rank, the DeepSpeed engine with bf16 autocast and ZeRO 1, synthetic batches already on the GPU
(so it measures the model, not the loader): audio of `--clip-s` seconds (10 s windows) and 32-token captions.
Model FLOPs per step are counted once with torch.utils.flop_counter (forward + backward of the model and loss);
MFU = FLOPs per step x steps per second / the GPU's dense bf16 peak (a table of common GPUs, or --peak-tflops).
`--gpu-path-on-cpu` runs this part on the CPU with the tiny model, to check the code path on machines without GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 peak TFLOP/s (no sparsity) by device-name substring; first match wins.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A6000", 155.0),
    ("A40", 150.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("4090", 165.0),
    ("3090", 71.0),
]


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------------------------------
# CPU: the tiny model through the real entry point


def bench_cpu(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="relret-bench-") as tmp:
        tmp = Path(tmp)
        if args.shards:
            train_dir, val_dir = Path(args.shards) / "train", Path(args.shards) / "val"
        else:
            sys.path.insert(0, str(REPO / "tests"))
            from shardkit import write_shard_dir

            train_dir, val_dir = tmp / "shards" / "train", tmp / "shards" / "val"
            write_shard_dir(
                train_dir, n_clips=args.clips, per_shard=16, durations_s=(2.0, 4.0, 6.0, 10.0), seed=1
            )  # longer than the 4 s crop: decoding cost as with real clips
            write_shard_dir(val_dir, split="val", n_clips=16, per_shard=8, seed=2)
        run_dir = tmp / "run"
        steps = args.warmup + args.steps
        cmd = [
            sys.executable,
            str(REPO / "relret" / "train.py"),
            "--config",
            str(REPO / "configs" / "tiny_cpu.yaml"),
            "--run-dir",
            str(run_dir),
            f"data.train=[{{path: {train_dir}}}]",
            f"data.val=[{val_dir}]",
            f"data.samples_per_epoch={steps * args.cpu_batch}",
            f"data.num_workers={args.num_workers}",
            f"train.global_batch_size={args.cpu_batch}",
            "train.epochs=1",
            f"train.checkpoint_every_steps={10 * steps}",
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"relret/train.py failed with exit code {proc.returncode}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train" and r["step"] > args.warmup]
        step_times = [args.cpu_batch / r["samples_per_s"] for r in train]
        waits = [r["data_wait"] * t for r, t in zip(train, step_times)]
        return {
            "steps": len(train),
            "samples_per_s": args.cpu_batch * len(train) / sum(step_times),
            "median_step_ms": 1000 * statistics.median(step_times),
            "data_wait": sum(waits) / sum(step_times),
            "wall_s": wall,
            "num_workers": args.num_workers,
            "batch": args.cpu_batch,
        }


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the full model


def full_model_config(tiny: bool):
    from relret.config import TrainConfig, load_config

    if tiny:
        cfg = load_config(TrainConfig, REPO / "configs" / "tiny_cpu.yaml")
    else:
        # configs/pretrain.yaml's model, with a random RoBERTa-large (no hub here) and the MiniLM WordPiece
        # tokenizer: the same FLOPs per token.
        cfg = load_config(
            TrainConfig,
            REPO / "configs" / "pretrain.yaml",
            ["model.text.random_init=true", "model.text.tokenizer=minilm", "model.audio.weights=null"],
        )
    return cfg


def _captions(n: int, words: int) -> list[str]:
    vocab = "a dog barks loudly while rain falls on the roof and birds sing in distance car engine starts".split()
    return [" ".join(vocab[(i + j) % len(vocab)] for j in range(words)) for i in range(n)]


def bench_gpu(args: argparse.Namespace) -> dict:
    import torch

    on_cpu = args.gpu_path_on_cpu
    if not on_cpu and not torch.cuda.is_available():
        return {"skipped": "no CUDA device here: the full-size GPU benchmark did not run"}
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from relret import distributed
    from relret.losses import build_loss
    from relret.models import build_model
    from relret.trainer import Plan, deepspeed_config

    cfg = full_model_config(tiny=(args.model or ("tiny" if on_cpu else "full")) == "tiny")
    device = torch.device("cpu") if on_cpu else torch.device("cuda", 0)
    if not dist.is_initialized():
        distributed.init_distributed(require_group=True)  # a file store for one process: nothing listens
    batch = args.batch
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    loss_fn = build_loss(cfg.loss)
    samples = int(args.clip_s * 32000)
    audio = 0.1 * torch.randn(batch, samples, device=device)
    audio_len = torch.full((batch,), samples, device=device, dtype=torch.long)
    captions = _captions(batch, args.caption_words)
    sbert = torch.nn.functional.normalize(torch.randn(batch, cfg.data.sbert_dim, device=device), dim=-1)
    ids = torch.arange(batch, device=device)
    bf16 = not on_cpu

    # FLOPs of one training step's model work (forward + backward), counted once outside DeepSpeed.
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        a, t = model(audio, audio_len, captions)
        loss_fn(a.float(), t.float(), sbert, ids)["loss"].backward()
    flops_per_step = counter.get_total_flops()
    model.zero_grad(set_to_none=True)

    plan = Plan(1, batch, 1000, 1000, 10, 1000 * batch)
    ds_cfg = deepspeed_config(cfg, plan, bf16)
    ds_cfg["train_batch_size"] = batch
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)

    def step() -> float:
        a, t = engine(audio, audio_len, captions)
        loss = loss_fn(a.float(), t.float(), sbert, ids)["loss"]
        engine.backward(loss)
        engine.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.gpu_warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.gpu_steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / args.gpu_steps
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    out = {
        "device": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch,
        "clip_s": args.clip_s,
        "step_s": seconds,
        "samples_per_s_per_gpu": batch / seconds,
        "model_tflops_per_step": flops_per_step / 1e12,
        "achieved_tflops": flops_per_step / seconds / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": (flops_per_step / seconds / 1e12 / peak) if peak else None,
    }
    if device.type == "cuda":
        out["max_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--steps", type=int, default=40, help="measured CPU steps")
    p.add_argument("--warmup", type=int, default=5, help="CPU steps left out of the figures")
    p.add_argument("--cpu-batch", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the CPU run")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the CPU run (a core is left to the workers)")
    p.add_argument("--clips", type=int, default=256, help="synthetic training clips")
    p.add_argument("--shards", default=None, help="existing shard root with train/ and val/ (sbert_dim 384)")
    p.add_argument("--batch", type=int, default=32, help="GPU batch")
    p.add_argument("--clip-s", type=float, default=10.0, help="GPU audio length (10: one PaSST window)")
    p.add_argument("--caption-words", type=int, default=40, help="words per synthetic caption (cut at 32 tokens)")
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--gpu-warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, when not in the table")
    p.add_argument("--gpu-path-on-cpu", action="store_true", help="run the GPU part on CPU (tiny model by default)")
    p.add_argument("--model", choices=("full", "tiny"), default=None, help="GPU-part model (default: full on GPU)")
    args = p.parse_args()
    if not args.gpu_only:
        r = bench_cpu(args)
        print(
            f"CPU tiny model ({r['batch']} samples/step, {r['num_workers']} worker(s), {r['steps']} steps measured): "
            f"{r['samples_per_s']:.1f} samples/s, median step {r['median_step_ms']:.0f} ms, "
            f"data wait {100 * r['data_wait']:.1f}% (target < 10%), run wall time {r['wall_s']:.1f} s",
            flush=True,
        )
    if not args.cpu_only or args.gpu_path_on_cpu:
        r = bench_gpu(args)
        if "skipped" in r:
            print(f"GPU: {r['skipped']}")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (pass --peak-tflops)"
            print(
                f"GPU {r['device']}: {r['params_M']:.1f} M params, batch {r['batch']} x {r['clip_s']:.0f} s, "
                f"{r['samples_per_s_per_gpu']:.1f} samples/s per GPU, {r['model_tflops_per_step']:.2f} TFLOP/step, "
                f"{r['achieved_tflops']:.1f} TFLOP/s achieved, MFU {mfu}"
                + (f", peak memory {r['max_memory_GiB']:.1f} GiB" if "max_memory_GiB" in r else "")
            )


if __name__ == "__main__":
    main()
