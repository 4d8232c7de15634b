"""The learning-rate schedule: linear warm-up, a cosine down to the minimum, then the minimum (the authors' shape).

Schedules are functions of the optimizer update index; `WarmupCosine` wraps one as a LambdaLR factor.

Two forms, chosen by whether the cosine has an end of its own (`optim.decay_end_epoch`):
- without one (relret's earlier curve): the cosine runs from update `warmup_updates` to the last update;
- with one (the authors', xieh97/text-audio-retrieval utils/optim_utils.update_lr, stepped per batch): update u
  takes the learning rate of the curve at epoch e = (u + 1) / steps_per_epoch, i.e. lr * e / W during the warm-up
  (e < W), the cosine from lr to min_lr over W <= e < D, and min_lr from e = D on.
Both have the same warm-up; they differ by where the cosine's first update sits (one update apart).
"""

from __future__ import annotations

import math


def _cosine(progress: float, lr: float, min_lr: float) -> float:
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(
    update: int,
    total_updates: int,
    warmup_updates: int,
    lr: float,
    min_lr: float,
    decay_end_updates: int | None = None,
) -> float:
    """Learning rate of optimizer update `update` (0-based): linear warm-up to `lr` over `warmup_updates` updates
    (the first update uses lr / warmup_updates), then a cosine from `lr` down to `min_lr`: at the last update
    (`decay_end_updates` None), or, in the authors' form, at update `decay_end_updates` - 1, after which the
    learning rate stays at `min_lr`."""
    if update < warmup_updates:
        return lr * (update + 1) / warmup_updates
    if decay_end_updates is None:
        span = total_updates - warmup_updates - 1
        progress = 1.0 if span <= 0 else min(1.0, (update - warmup_updates) / span)
        return _cosine(progress, lr, min_lr)
    # The authors' form in updates: epoch e = (u + 1) / S, warm-up end W = warmup_updates / S, end D = decay_end / S.
    done = update + 1
    if done >= decay_end_updates:
        return min_lr
    return _cosine((done - warmup_updates) / (decay_end_updates - warmup_updates), lr, min_lr)


class WarmupCosine:
    """`lr_at` as a LambdaLR factor (a callable object, so its settings are saved with the scheduler state)."""

    def __init__(
        self, total_updates: int, warmup_updates: int, lr: float, min_lr: float, decay_end_updates: int | None = None
    ) -> None:
        self.total_updates, self.warmup_updates, self.lr, self.min_lr = total_updates, warmup_updates, lr, min_lr
        self.decay_end_updates = decay_end_updates

    def __call__(self, update: int) -> float:
        return (
            lr_at(update, self.total_updates, self.warmup_updates, self.lr, self.min_lr, self.decay_end_updates)
            / self.lr
        )
