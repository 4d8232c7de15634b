"""bench/loader.py's stream paired with its ceiling: the ceiling decodes the very clips and windows the stream did."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import loader as loader_bench  # noqa: E402  (bench/loader.py)

from relret.data import DamageCounter, _shard_samples, open_shard_dir  # noqa: E402
from relret.flac_crop import read_flac_window  # noqa: E402
from relret.tar_member import TarMember  # noqa: E402


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return loader_bench.write_corpus(tmp_path_factory.mktemp("bench-loader"), "wavcaps", n_clips=6, per_shard=3)


def test_the_bytes_in_ram_are_the_members_the_stream_reads(shard_dir):
    """`by_place` finds every clip the stream lists, by the place its TarMember names, with the same bytes, so the
    paired ceiling decodes the same windows of the same FLAC data from RAM."""
    urls = open_shard_dir(str(shard_dir), 384).urls
    in_ram = loader_bench.by_place(loader_bench.flac_in_memory(shard_dir))
    members = [raw["flac"] for url in urls for raw in _shard_samples(url, DamageCounter("test")) if "flac" in raw]
    assert len(members) == 6 and all(isinstance(m, TarMember) for m in members)
    assert len(in_ram) == 6
    for m in members:
        data = in_ram[(m.shard.path, m.offset)]
        assert data == m.read()
        start, n = 40_000, 32_000
        from_ram, from_shard = np.empty(n, np.int16), np.empty(n, np.int16)
        np.testing.assert_array_equal(read_flac_window(data, start, from_ram), read_flac_window(m, start, from_shard))


def test_the_paired_run_times_a_ceiling_for_every_crop_the_stream_decoded(shard_dir):
    """Over the timed batches the workers decode the ceiling for exactly the stream's crops, and both rates are
    positive."""
    args = argparse.Namespace(prefetch_factor=2, epoch_unit="caption", shuffle_buffer=4)
    in_ram = loader_bench.by_place(loader_bench.flac_in_memory(shard_dir))
    r = loader_bench.stream_rate(shard_dir, 10.0, 1, batch=2, batches=3, args=args, in_ram=in_ram)
    assert r["clips"] == 6
    assert r["ceiling_clips"] == r["clips"]
    assert r["per_worker_cpu_s"] > 0 and r["ceiling"] > 0
    assert r["paired_ratio"] == pytest.approx(r["per_worker_cpu_s"] / r["ceiling"])
    lo, mid, hi = r["batch_ratios"]
    assert 0 < lo <= mid <= hi
    # the timing wrapper lived in the worker only: this process's decoder is relret's own and nothing holds its clips
    import relret.data
    from relret import flac_crop

    assert relret.data.read_flac_window is flac_crop.read_flac_window
    assert loader_bench._DECODES_MADE == []
