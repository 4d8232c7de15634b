"""hear21passt's hand-written attention against FusedAttention (F.scaled_dot_product_attention), side by side.

    python bench/attention.py [--batch 2] [--tokens 1190] [--rounds 5] [--threads 0] [--no-memory]
    python bench/attention.py --checkpoint-blocks 2 [--checkpoint-batch 2]   # + activation checkpointing on CPU

CPU: forward + backward of one PaSST-S attention layer (768 wide, 12 heads) on [batch, tokens, 768]; both
contenders share the same weights and input, and rounds alternate between them so drift in machine load hits both
alike (medians reported). Peak memory on CPU is the growth of the process's peak RSS over one step (Linux: VmHWM
reset through /proc/self/clear_refs), measured in a fresh subprocess per contender, next to the size of the
attention matrices the fused kernel never stores.

With --checkpoint-blocks N (CPU): N PaSST-S blocks with fused attention on one 10 s window per sample (stride 16:
498 tokens), forward + backward of `forward_features` at --checkpoint-batch, with and without
`checkpoint_passt_blocks`: median step time (alternating rounds) and the growth of peak RSS over one step (fresh
subprocess each), so the memory that checkpointing saves and the recomputation it costs are measured side by side.

CUDA (when present): a full PaSST-S training step (768/12/12, stride 16, 128 x 998 input, forward + backward + AdamW)
at --cuda-batch, in bf16 autocast and in fp32, for hand-written, fused, and fused with checkpointed blocks, with
`torch.cuda.max_memory_allocated` of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # relret from this checkout, installed or not

import torch  # noqa: E402
from torch import nn  # noqa: E402

import relret  # noqa: F401, E402  (compatibility step before hear21passt imports torchaudio/timm)
from relret.models.attention import FusedAttention, checkpoint_passt_blocks  # noqa: E402

MIB = 2**20


def attention_layers(dim: int, heads: int) -> dict[str, nn.Module]:
    from hear21passt.models.passt import Attention

    torch.manual_seed(0)
    hand = Attention(dim, num_heads=heads, qkv_bias=True).train()
    return {"hand-written": hand, "fused": FusedAttention.from_attention(hand)}


def attention_step(layer: nn.Module, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).sum().backward()


def alternate(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median seconds per contender; one warm-up call each, then `rounds` rounds in alternating order."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(contenders[name]())
    return {name: statistics.median(t) for name, t in times.items()}


def timer(step: Callable[[], None]) -> Callable[[], float]:
    """`step` as a contender of `alternate`: it runs once and returns its wall seconds."""

    def run() -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    return run


def child_peak_rss(name: str, cmd: list[str]) -> int | None:
    """Peak RSS growth in bytes printed by a child (`cmd`, this script in a --child mode), printed as a line; None
    (and why) where it could not be measured."""
    child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode != 0:  # e.g. no /proc/self/clear_refs (not Linux)
        print(f"  peak RSS of {name} not measured: {child.stderr.strip().splitlines()[-1:]}")
        return None
    growth = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_growth"]
    print(f"  peak RSS growth over one step (fresh process), {name:<13} {growth / MIB:8.0f} MiB")
    return growth


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def cpu_peak_rss_child(name: str, batch: int, tokens: int, dim: int, heads: int) -> None:
    """(subprocess) Print the growth of peak RSS, in bytes, over one forward + backward of one contender (Linux)."""
    layer = attention_layers(dim, heads)[name]
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    # Imports peak higher than a step does: reset the peak (VmHWM) to the current RSS before measuring.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _proc_status_bytes("VmRSS")
    attention_step(layer, x)
    print(json.dumps({"peak_rss_growth": _proc_status_bytes("VmHWM") - before}))


def cpu_bench(args: argparse.Namespace) -> None:
    dim, heads = args.dim, args.heads
    layers = attention_layers(dim, heads)
    x = torch.randn(args.batch, args.tokens, dim, requires_grad=True)

    steps = {name: timer(lambda layer=layer: attention_step(layer, x)) for name, layer in layers.items()}
    medians = alternate(steps, args.rounds)
    print(
        f"CPU ({torch.get_num_threads()} threads), one attention layer {dim}/{heads} heads, batch {args.batch} x "
        f"{args.tokens} tokens, forward+backward, median of {args.rounds} alternating rounds:"
    )
    for name, seconds in medians.items():
        print(f"  {name:<13} {seconds * 1e3:8.1f} ms")
    print(f"  hand-written / fused = {medians['hand-written'] / medians['fused']:.2f}x")
    attn_bytes = args.batch * heads * args.tokens**2 * 4
    print(
        f"  attention matrix [B, heads, N, N] float32 the fused kernel never stores: {attn_bytes / MIB:.0f} MiB per "
        f"layer (hand-written keeps one for backward, its softmax output; a 12-block PaSST-S: "
        f"{12 * attn_bytes / MIB:.0f} MiB at this batch)"
    )
    if args.no_memory:
        return
    for name in layers:
        cmd = [sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--tokens", str(args.tokens)]
        cmd += ["--dim", str(dim), "--heads", str(heads), "--threads", str(args.threads)]
        child_peak_rss(name, cmd)


def passt_s(depth: int = 12) -> nn.Module:
    """hear21passt's PaSST-S (768 wide, 12 heads, stride 16, 128 x 998 input) of `depth` blocks with its own
    attention, random weights (seed 0), no classification heads."""
    from hear21passt.models import passt as passt_module

    passt_module.first_RUN = False
    torch.manual_seed(0)
    model = passt_module.PaSST(
        img_size=(128, 998), patch_size=16, stride=(16, 16), in_chans=1, num_classes=0, embed_dim=768, depth=depth,
        num_heads=12, distilled=True,
    )  # fmt: skip
    model.head = nn.Identity()
    model.head_dist = None
    return model


def passt_blocks(depth: int, checkpointed: bool) -> nn.Module:
    """`passt_s(depth)` with fused attention, in training mode."""
    from relret.models.attention import fuse_passt_attention

    model = passt_s(depth)
    fuse_passt_attention(model)
    if checkpointed:
        checkpoint_passt_blocks(model)
    return model.train()


def passt_step(model: nn.Module, spec: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    cls_token, dist_token = model.forward_features(spec)
    ((cls_token + dist_token) / 2).pow(2).mean().backward()


def checkpoint_peak_rss_child(checkpointed: bool, depth: int, batch: int) -> None:
    """(subprocess) Print the growth of peak RSS, in bytes, over one PaSST training step (Linux)."""
    model = passt_blocks(depth, checkpointed)
    spec = torch.randn(batch, 1, 128, 998)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _proc_status_bytes("VmRSS")
    passt_step(model, spec)
    print(json.dumps({"peak_rss_growth": _proc_status_bytes("VmHWM") - before}))


def cpu_checkpoint_bench(args: argparse.Namespace) -> None:
    depth, batch = args.checkpoint_blocks, args.checkpoint_batch
    models = {"plain": passt_blocks(depth, False), "checkpointed": passt_blocks(depth, True)}
    spec = torch.randn(batch, 1, 128, 998)

    steps = {name: timer(lambda model=model: passt_step(model, spec)) for name, model in models.items()}
    medians = alternate(steps, args.rounds)
    print(
        f"CPU ({torch.get_num_threads()} threads), PaSST-S {depth} block(s), fused attention, batch {batch} x 10 s "
        f"(498 tokens), forward+backward, median of {args.rounds} alternating rounds:"
    )
    for name, seconds in medians.items():
        print(f"  {name:<13} {seconds * 1e3:8.1f} ms")
    print(f"  checkpointed / plain = {medians['checkpointed'] / medians['plain']:.2f}x time")
    if args.no_memory:
        return
    growth = {}
    for name in models:
        cmd = [sys.executable, __file__, "--checkpoint-child", name, "--checkpoint-blocks", str(depth)]
        cmd += ["--checkpoint-batch", str(batch), "--threads", str(args.threads)]
        growth[name] = child_peak_rss(name, cmd)
    if None not in growth.values():
        print(f"  checkpointed / plain = {growth['checkpointed'] / growth['plain']:.2f}x peak RSS growth")


def cuda_bench(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    model = passt_s().to(device).train()
    hand = [block.attn for block in model.blocks]
    # Both sets of attention modules hold the same parameters; `configure` puts one set into the blocks per step.
    fused = [FusedAttention.from_attention(attn) for attn in hand]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    spec = torch.randn(args.cuda_batch, 1, 128, 998, device=device)

    def configure(attn: list[nn.Module], checkpointed: bool) -> None:
        for block, module in zip(model.blocks, attn):
            block.attn = module
            block.__dict__.pop("forward", None)
        if checkpointed:
            checkpoint_passt_blocks(model)

    def step(dtype: torch.dtype | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            cls_token, dist_token = model.forward_features(spec)
        ((cls_token + dist_token) / 2).float().pow(2).mean().backward()
        optimizer.step()

    contenders = {"hand-written": (hand, False), "fused": (fused, False), "fused+checkpoint": (fused, True)}
    tokens = 2 + ((128 - 16) // 16 + 1) * ((998 - 16) // 16 + 1)
    for label, dtype in (("bf16 autocast", torch.bfloat16), ("fp32", None)):
        memory: dict[str, int] = {}

        def timed(name: str, dtype=dtype, memory=memory) -> Callable[[], float]:
            def run() -> float:
                configure(*contenders[name])
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step(dtype)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                memory[name] = torch.cuda.max_memory_allocated()
                return seconds

            return run

        medians = alternate({name: timed(name) for name in contenders}, args.rounds)
        print(
            f"CUDA {torch.cuda.get_device_name()}, PaSST-S 768/12/12 stride 16 ({tokens} tokens), batch "
            f"{args.cuda_batch}, {label}, forward+backward+AdamW, median of {args.rounds} alternating rounds:"
        )
        for name, seconds in medians.items():
            print(f"  {name:<17} {seconds * 1e3:8.1f} ms/step  max_memory_allocated {memory[name] / 2**30:6.2f} GiB")
        print(f"  hand-written / fused = {medians['hand-written'] / medians['fused']:.2f}x")
    configure(hand, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="CPU batch size")
    parser.add_argument("--tokens", type=int, default=1190, help="CPU sequence length (PaSST-S stride 10, 10 s: 1190)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cuda-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS subprocesses")
    parser.add_argument(
        "--checkpoint-blocks", type=int, default=0, help="CPU: PaSST-S blocks for the checkpointing run (0: skip it)"
    )
    parser.add_argument("--checkpoint-batch", type=int, default=2, help="CPU batch (10 s windows) of that run")
    parser.add_argument("--child", choices=["hand-written", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-child", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        cpu_peak_rss_child(args.child, args.batch, args.tokens, args.dim, args.heads)
        return
    if args.checkpoint_child:
        checkpoint_peak_rss_child(
            args.checkpoint_child == "checkpointed", args.checkpoint_blocks, args.checkpoint_batch
        )
        return
    cpu_bench(args)
    if args.checkpoint_blocks:
        cpu_checkpoint_bench(args)
    if torch.cuda.is_available():
        cuda_bench(args)
    else:
        print("no CUDA here: the full PaSST-S step time and torch.cuda.max_memory_allocated were not measured")


if __name__ == "__main__":
    main()
