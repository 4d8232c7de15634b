import hashlib

import pytest

from relret.shard_format import ShardInfo, SkippedInput
from shards import cursor, job, progress
from shards.readers import ClipSpec


def _record(index, start, end, fingerprint="f"):
    return progress.Record(fingerprint, index, start, end, [], ShardInfo(f"x-{index}.tar", end - start, 1, "0"), 4)


def test_gaps_between_verified_shards():
    """Positions not covered by verified shards are planned in order, each gap knowing its first shard index and the
    shard it must end at."""
    gap = cursor.Gap
    assert job.plan_gaps([], 30) == [gap(0, 30, 0, None)]
    assert job.plan_gaps([_record(0, 0, 10), _record(1, 10, 21)], 30) == [gap(21, 30, 2, None)]
    assert job.plan_gaps([_record(0, 0, 10), _record(3, 25, 30)], 30) == [gap(10, 25, 1, 3)]
    assert job.plan_gaps([_record(1, 10, 20)], 20) == [gap(0, 10, 0, 1)]
    assert job.plan_gaps([_record(0, 0, 10), _record(1, 10, 20)], 20) == []


@pytest.mark.parametrize(
    "records",
    [
        [_record(0, 0, 10), _record(2, 10, 20)],  # shard 1 would be empty
        [_record(0, 0, 10), _record(1, 12, 20)],  # positions 10-11 belong to no shard
        [_record(0, 0, 10), _record(1, 8, 20)],  # overlap
        [_record(0, 0, 40)],  # more positions than clips
    ],
)
def test_records_that_cannot_come_from_one_run_are_refused(records):
    """Records that do not tile the clip order raise ResumeMismatch instead of producing duplicate or lost clips."""
    with pytest.raises(job.ResumeMismatch):
        job.plan_gaps(records, 30)


def test_fingerprint_covers_order_captions_and_settings():
    """The fingerprint changes with the clip order, a caption or a setting, and with nothing else."""
    a, b = ClipSpec("a.wav", "a.wav", ("x", "y")), ClipSpec("b.wav", "b.wav", ("z",))
    settings = {"samples_per_shard": 4}
    base = progress.fingerprint([a, b], settings)
    assert progress.fingerprint([ClipSpec("a.wav", "a.wav", ("x", "y")), b], dict(settings)) == base
    assert progress.fingerprint([b, a], settings) != base
    assert progress.fingerprint([ClipSpec("a.wav", "a.wav", ("x", "Y")), b], settings) != base
    assert progress.fingerprint([a, b], {"samples_per_shard": 5}) != base


def test_records_round_trip_and_verify(tmp_path):
    """A written record reads back; a shard verifies only with its recorded size and sha256; unreadable records are
    ignored (their shard is redone)."""
    shard = tmp_path / "x-0.tar"
    shard.write_bytes(b"tar bytes")
    info = ShardInfo("x-0.tar", 3, 9, hashlib.sha256(b"tar bytes").hexdigest())
    record = {"fingerprint": "f", "index": 0, "start": 0, "end": 4, "sbert_dim": 384, "shard": info.__dict__,
              "skipped": [{"source": "b.wav", "reason": "audio file not found"}]}  # fmt: skip
    progress.write_record(str(tmp_path), record)
    (tmp_path / progress.PROGRESS_DIR / "x-1.tar.json").write_text("{not json")
    [back] = progress.read_records(str(tmp_path))
    assert back.shard == info and back.skipped == [SkippedInput("b.wav", "audio file not found")]
    assert progress.verify_shard(str(tmp_path), info.__dict__)
    shard.write_bytes(b"tar bytez")
    assert not progress.verify_shard(str(tmp_path), info.__dict__)
    assert progress.verify_shard(str(tmp_path), info.__dict__, check_sha256=False)
    shard.unlink()
    assert not progress.verify_shard(str(tmp_path), info.__dict__, check_sha256=False)


def test_clip_order_is_seeded_and_independent_of_input_order():
    """The order depends on the clips and the seed only, not on the order the metadata listed them in."""
    clips = [ClipSpec(f"{i}.wav", f"{i}.wav", ("c",)) for i in range(50)]
    order = [c.source for c in job.order_clips(clips, 1)]
    assert [c.source for c in job.order_clips(clips[::-1], 1)] == order
    assert [c.source for c in job.order_clips(clips, 2)] != order
    assert sorted(order) == sorted(c.source for c in clips)
