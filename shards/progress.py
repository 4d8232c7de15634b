"""Progress records: what makes a shard job resumable.

When a shard is complete and visible under its final name, its writer stores `_progress/{shard}.json` beside it:
the job's fingerprint, the shard's ShardInfo (samples, bytes, sha256), the range [start, end) of positions in the
job's ordered clip list that the shard consumed, and the clips of that range that were skipped (bad audio) with the
reason. A rerun reads the records, keeps those whose shard still verifies (size and sha256, or size only if asked),
and processes only the positions no kept record covers. Because shard boundaries depend only on the ordered clip
list and on which clips fail, the rerun writes exactly the shards a run without a crash would have written.

The fingerprint hashes everything that decides shard content except the audio bytes: the ordered clip list (sources,
audio paths, captions), dataset, split, samples per shard, max duration, seed, SBERT model and format version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from relret import storage
from relret.shard_format import FORMAT_VERSION, ShardInfo, SkippedInput, sha256_of

PROGRESS_DIR = "_progress"


@dataclasses.dataclass
class Record:
    """One finished shard: which positions of the ordered clip list it consumed."""

    fingerprint: str
    index: int
    start: int
    end: int
    skipped: list[SkippedInput]
    shard: ShardInfo
    sbert_dim: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        return cls(
            fingerprint=data["fingerprint"],
            index=int(data["index"]),
            start=int(data["start"]),
            end=int(data["end"]),
            skipped=[SkippedInput(**s) for s in data["skipped"]],
            shard=ShardInfo(**data["shard"]),
            sbert_dim=int(data["sbert_dim"]),
        )


def fingerprint(clips: Sequence[Any], settings: dict[str, Any]) -> str:
    """sha256 over the ordered clips (source, audio_path, captions) and the content-deciding settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"format_version": FORMAT_VERSION, **settings}, sort_keys=True).encode())
    for clip in clips:
        h.update(json.dumps([clip.source, clip.audio_path, list(clip.captions)], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def record_url(out_dir: str, shard_name: str) -> str:
    return storage.join(out_dir, PROGRESS_DIR, shard_name + ".json")


def write_record(out_dir: str, record: dict[str, Any]) -> None:
    """Store a record (atomically); `record` is `Record` as a dict."""
    storage.write_bytes(record_url(out_dir, record["shard"]["name"]), json.dumps(record, indent=1).encode())


def read_records(out_dir: str) -> list[Record]:
    """Every readable record in `out_dir`, by shard index. Unreadable records are ignored (their shard is redone)."""
    out = []
    for url in storage.list_files(storage.join(out_dir, PROGRESS_DIR), "*.tar.json"):
        try:
            out.append(Record.from_dict(json.loads(storage.read_bytes(url))))
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(out, key=lambda r: r.index)


def verify_shard(out_dir: str, info: dict[str, Any], check_sha256: bool = True) -> bool:
    """True if the shard exists with the recorded size (and sha256)."""
    url = storage.join(out_dir, info["name"])
    if not storage.exists(url) or storage.size(url) != info["bytes"]:
        return False
    return not check_sha256 or sha256_of(url) == info["sha256"]
