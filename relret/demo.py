"""`make demo` (`python -m relret demo`): what the system can show on this machine so far.

This is the foundation stage: the end-to-end run (synthetic corpus -> Ray shards -> DeepSpeed pretraining and
fine-tuning -> evaluation) replaces it once those parts exist. Today it shows the method's core on example captions
with the real Sentence-BERT model: target relevances, and ListNet against InfoNCE on one batch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

# Hand-written example captions in Clotho's style (clip, caption); two captions describe the same clip.
CAPTIONS = [
    ("pages", "A person is turning the pages of a book."),
    ("pages", "Someone flips through the pages of a magazine quickly."),
    ("book", "Pages of a book are turned slowly and then quickly."),
    ("coaster", "People scream as a roller coaster rattles along its track."),
    ("elevator", "An elevator chimes and a computer voice announces a floor."),
]


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m relret demo", description=__doc__.split("\n\n")[0]).parse_args(argv)
    from relret.losses import InfoNCELoss, ListNetLoss
    from relret.relevance import relevance_matrix
    from relret.sbert import embed_captions, load_sbert

    print("relret demo (foundation stage): the end-to-end training demo is not built yet; showing the method's core.")
    model = load_sbert(device="cpu")
    texts = [c for _, c in CAPTIONS]
    sbert = torch.from_numpy(embed_captions(model, texts))
    g = relevance_matrix(sbert, sbert)
    print("\nTarget relevance g = 1/(1+exp(2.73 - 4.58 h)) of clip j (by its caption) to caption i, all-MiniLM-L6-v2:")
    for i, text in enumerate(texts):
        print(f"  {text[:58]:<58} " + " ".join(f"{v:.2f}" for v in g[i].tolist()))
    torch.manual_seed(0)
    audio, text_emb = torch.randn(len(texts), 16), torch.randn(len(texts), 16)
    names = sorted({name for name, _ in CAPTIONS})
    clip_ids = torch.tensor([names.index(name) for name, _ in CAPTIONS])
    listnet = ListNetLoss("t2a")(audio, text_emb, sbert, clip_ids)["loss"].item()
    infonce = InfoNCELoss("both")(audio, text_emb, sbert, clip_ids)["loss"].item()
    print(f"\nOn random 16-d embeddings of this batch: ListNet (t2a) loss {listnet:.3f}, InfoNCE loss {infonce:.3f}.")
    print("Calibrate the constants for this model: python -m relret calibrate --help")
    return 0
