"""A relevance function and a loss that relret does not ship, added the way a user adds theirs: defined here,
registered from the outside (`register()`), with no line of relret changed (tests/integration/test_plugins.py)."""

from __future__ import annotations

import dataclasses

import torch

from relret.config import LOSSES, RELEVANCE_FNS
from relret.losses import GatheredBatch, GlobalBatchLoss

SQUARED = "test_squared"
MARGIN = "test_margin"


def squared_relevance(h: torch.Tensor, cfg, positives: torch.Tensor | None = None) -> torch.Tensor:
    """g = max(h, 0)^2: only clearly similar captions count."""
    return h.clamp_min(0.0).square()


@dataclasses.dataclass
class MarginOptions:
    """The margin loss's own config section (`loss.test_margin`)."""

    margin: float = 0.2
    """Hinge margin between a caption's own clip and every other clip, in cosine."""

    def __post_init__(self) -> None:
        if not self.margin > 0:
            from relret.config import ConfigError

            raise ConfigError(f"loss.test_margin.margin must be > 0, got {self.margin}")


class MarginLoss(GlobalBatchLoss):
    """Text-to-audio hinge loss over the global batch: mean of relu(margin - cos(own) + cos(other))."""

    inputs = ("clip_ids",)

    def __init__(self, margin: float, tau: float, local_loss: bool, gather_with_grad: bool) -> None:
        super().__init__("t2a", tau, local_loss, gather_with_grad)
        self.margin = margin

    @classmethod
    def from_config(cls, cfg) -> MarginLoss:
        return cls(cfg.options.margin, cfg.tau, cfg.local_loss, cfg.gather_with_grad)

    def compute(self, batch: GatheredBatch) -> dict[str, torch.Tensor]:
        cos = batch.text[batch.rows] @ batch.audio.T
        ids = batch.inputs["clip_ids"]
        own = ids[batch.rows, None] == ids[None, :]
        pos = (cos * own).sum(1, keepdim=True) / own.sum(1, keepdim=True)
        hinge = torch.relu(self.margin - pos + cos)[~own]
        return {"loss": hinge.mean(), "margin_violations": (hinge > 0).float().mean()}


def register() -> None:
    """Add both to relret's registries (once per process)."""
    if SQUARED not in RELEVANCE_FNS:
        RELEVANCE_FNS.register(SQUARED, squared_relevance)
    if MARGIN not in LOSSES:
        LOSSES.register(MARGIN, MarginLoss, config=MarginOptions)


if __name__ == "__main__":  # python tests/kit/plugins.py TRAIN_ARGS...: relret/train.py with both registered
    import sys

    register()
    from relret.train import main

    sys.exit(main(sys.argv[1:]))
