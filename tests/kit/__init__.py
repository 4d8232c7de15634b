"""Helpers the tests import as a package (`from kit.shards import ...`): synthetic shards, process control, the
SLURM probe that stands in for training."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
