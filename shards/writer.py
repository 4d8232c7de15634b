"""The shard writer: a Ray actor that assembles one tar shard at a time from encoded audio and SBERT embeddings.

A shard is written with `webdataset.TarWriter` to a temporary file (beside the target for local output, in a local
staging directory for S3) and appears under its final name only once complete: renamed on a file system, uploaded
in one piece to S3. Right after that, the writer records the shard in `_progress/` (see `shards/progress.py`), which
is how a rerun knows the shard is done. Tar headers carry a fixed mtime and owner, so the same samples give the same
bytes (and sha256) on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from relret import storage
from relret.shard_format import SampleMeta, ShardInfo, encode_sample
from shards import progress

TAR_MTIME = 0
"""An integer: tarfile writes a float mtime as a pax extended header before every member, which doubles the headers a
reader parses per member (listing a shard took 2.4x as long)."""
TAR_OWNER = "relret"


class ShardWriter:
    """Writes shards into one output directory; use as a Ray actor (`ray.remote(ShardWriter)`)."""

    def __init__(self, out_dir: str, staging_dir: str | None = None) -> None:
        self.out_dir = out_dir
        self.staging_dir = staging_dir
        self._name: str | None = None
        self._commit: AbstractContextManager[str] | None = None
        self._tar: Any = None
        self._count = 0
        self._sbert_dim = 0

    def begin(self, name: str) -> None:
        """Start shard `name` (the previous one must have been finished)."""
        import webdataset as wds

        if self._name is not None:
            raise RuntimeError(f"shard {self._name} was not finished before {name} began")
        self._commit = storage.atomic_local_file(storage.join(self.out_dir, name), self.staging_dir)
        tmp = self._commit.__enter__()
        self._name, self._count = name, 0
        self._tar = wds.TarWriter(tmp, user=TAR_OWNER, group=TAR_OWNER, mtime=TAR_MTIME, encoder=False)
        self._tmp = tmp

    def add(self, encoded: list[tuple[dict, bytes] | None], sbert: np.ndarray, rows: list[tuple[int, int, int]]) -> int:
        """Append samples: `encoded[i]` is (SampleMeta fields, FLAC bytes) of clip i of an audio task, `sbert` the
        float16 [n_captions_of_the_task, D] embeddings of that task's captions, and each (i, start, end) in `rows` adds
        clip i with embeddings sbert[start:end]. Returns the shard's sample count so far."""
        try:
            for i, start, end in rows:
                item = encoded[i]
                assert item is not None, f"clip {i} of this task was skipped and cannot be written"
                meta, flac = item
                self._tar.write(encode_sample(SampleMeta(**meta), flac, sbert[start:end]))
                self._sbert_dim = int(sbert.shape[1])
                self._count += 1
        except BaseException:
            self.abort()
            raise
        return self._count

    def finish(self, expected_samples: int, record: dict[str, Any]) -> dict[str, Any]:
        """Close the shard, check it holds `expected_samples`, publish it under its final name, then write its
        progress record (`record` plus the shard's count, bytes and sha256). Returns the record."""
        try:
            if self._count != expected_samples:
                raise RuntimeError(f"shard {self._name} holds {self._count} samples, expected {expected_samples}")
            self._tar.close()
            self._tar = None
            size, sha = _size_and_sha256(self._tmp)
            info = ShardInfo(self._name, self._count, size, sha)
            self._commit.__exit__(None, None, None)  # rename or upload: the shard is now visible
        except BaseException:
            self.abort()
            raise
        self._name, self._commit = None, None
        full = {**record, "shard": dataclasses.asdict(info), "sbert_dim": self._sbert_dim}
        progress.write_record(self.out_dir, full)
        return full

    def abort(self) -> None:
        """Drop the shard being written (nothing appears under its final name)."""
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:  # the temporary file is deleted below either way
                pass
            self._tar = None
        if self._commit is not None:
            commit, self._commit = self._commit, None
            try:
                commit.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
        self._name = None


def _size_and_sha256(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return os.path.getsize(path), h.hexdigest()
