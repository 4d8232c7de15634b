"""The learning-rate schedule: linear warm-up, then a cosine down to the minimum (the authors' shape).

Schedules are functions of the optimizer update index; `WarmupCosine` wraps one as a LambdaLR factor.
"""

from __future__ import annotations

import math


def lr_at(update: int, total_updates: int, warmup_updates: int, lr: float, min_lr: float) -> float:
    """Learning rate of optimizer update `update` (0-based): linear warm-up to `lr` over `warmup_updates` updates
    (the first update uses lr / warmup_updates), then a cosine from `lr` down to `min_lr` at the last update."""
    if update < warmup_updates:
        return lr * (update + 1) / warmup_updates
    span = total_updates - warmup_updates - 1
    progress = 1.0 if span <= 0 else min(1.0, (update - warmup_updates) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """`lr_at` as a LambdaLR factor (a callable object, so its settings are saved with the scheduler state)."""

    def __init__(self, total_updates: int, warmup_updates: int, lr: float, min_lr: float) -> None:
        self.total_updates, self.warmup_updates, self.lr, self.min_lr = total_updates, warmup_updates, lr, min_lr

    def __call__(self, update: int) -> float:
        return lr_at(update, self.total_updates, self.warmup_updates, self.lr, self.min_lr) / self.lr
