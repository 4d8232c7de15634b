"""Time of ListNet (targets included) over InfoNCE, forward + backward, measured side by side in one run.

    python bench/losses.py [--batch 1024] [--embed-dim 1024] [--sbert-dim 768] [--repeats 30]

Both losses get the same inputs; rounds alternate between them so drift in machine load hits both alike. The
ListNet time includes computing the relevance targets from the Sentence-BERT vectors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from relret.losses import InfoNCELoss, ListNetLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024, help="global batch size")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--sbert-dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    audio = torch.randn(args.batch, args.embed_dim, generator=gen, requires_grad=True)
    text = torch.randn(args.batch, args.embed_dim, generator=gen, requires_grad=True)
    sbert = torch.nn.functional.normalize(torch.randn(args.batch, args.sbert_dim, generator=gen), dim=1)
    ids = torch.arange(args.batch)
    losses = {}
    for direction in ("t2a", "both"):
        losses[f"ListNet {direction}"] = ListNetLoss(direction)
        losses[f"InfoNCE {direction}"] = InfoNCELoss(direction)

    def step(fn) -> float:
        audio.grad = text.grad = None
        t0 = time.perf_counter()
        fn(audio, text, sbert, ids)["loss"].backward()
        return time.perf_counter() - t0

    for fn in losses.values():  # warm-up
        step(fn)
    times = {name: [] for name in losses}
    for _ in range(args.repeats):
        for name, fn in losses.items():
            times[name].append(step(fn))
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(
        f"global batch {args.batch}, embedding {args.embed_dim}, SBERT {args.sbert_dim}, CPU threads "
        f"{torch.get_num_threads()}, {args.repeats} alternating rounds, median forward+backward:"
    )
    for name, ms in med.items():
        print(f"  {name:<13} {ms:8.2f} ms")
    for direction in ("t2a", "both"):
        ratio = med[f"ListNet {direction}"] / med[f"InfoNCE {direction}"]
        print(f"ratio ListNet/InfoNCE ({direction}): {ratio:.3f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
