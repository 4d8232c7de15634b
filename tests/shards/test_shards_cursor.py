"""The shard cursor (no Ray): which clips fill which shard, checked against a plain loop over the clips."""

import random

import pytest

from relret.shard_format import SkippedInput
from shards.cursor import AddSamples, BeginShard, FinishShard, Gap, ResumeMismatch, ShardCursor, plan_gaps


def _reference(failed: list[bool], samples_per_shard: int):
    """The plain loop: survivors fill shards in clip order; a shard spans from the end of the previous one to its last
    sample and owns the failures in that span. Returns ([(start, end, member positions, skipped positions)], trailing
    skipped positions)."""
    shards, members, skipped, start = [], [], [], 0
    for pos, bad in enumerate(failed):
        if bad:
            skipped.append(pos)
            continue
        members.append(pos)
        if len(members) == samples_per_shard:
            shards.append((start, pos + 1, members, skipped))
            start, members, skipped = pos + 1, [], []
    if members:
        shards.append((start, len(failed), members, skipped))
        skipped = []
    return shards, skipped


def _outcome(pos: int, failed: list[bool]) -> SkippedInput | None:
    return SkippedInput(f"clip{pos}.wav", f"audio file is empty (0 bytes): /a/clip{pos}.wav") if failed[pos] else None


def _drive(gaps: list[Gap], failed: list[bool], samples_per_shard: int, clips_per_task: int):
    """Run the cursor over `gaps` as the dispatcher would, checking the writer protocol on the way. Returns
    ({index: (start, end, member positions, skipped positions)}, trailing skipped positions, chunks)."""
    cursor = ShardCursor(gaps, samples_per_shard, clips_per_task)
    open_shards: dict[int, list[int]] = {}
    shards: dict[int, tuple] = {}
    chunks = list(cursor.chunks())
    for chunk in chunks:
        outcomes = [_outcome(p, failed) for p in range(chunk.start, chunk.end)]
        for action in cursor.feed(chunk, outcomes):
            _apply(action, chunk.start, open_shards, shards)
    for action in cursor.close():
        assert isinstance(action, FinishShard)
        _apply(action, None, open_shards, shards)
    assert open_shards == {}, "every shard begun was finished"
    trailing = [int(s.source[4:-4]) for s in cursor.trailing]
    assert [int(s.source[4:-4]) for s in cursor.skipped] == [
        p for c in chunks for p in range(c.start, c.end) if failed[p]
    ]
    return shards, trailing, chunks


def _apply(action, chunk_start, open_shards, shards) -> None:
    if isinstance(action, BeginShard):
        assert action.index not in open_shards and action.index not in shards
        open_shards[action.index] = []
    elif isinstance(action, AddSamples):
        assert list(action.offsets) == sorted(set(action.offsets))
        open_shards[action.index] += [chunk_start + j for j in action.offsets]
    else:
        members = open_shards.pop(action.index)
        assert action.samples == len(members)
        skipped = [int(s.source[4:-4]) for s in action.skipped]
        record = action.record("fp")
        assert (record["index"], record["start"], record["end"]) == (action.index, action.start, action.end)
        assert [s["source"] for s in record["skipped"]] == [s.source for s in action.skipped]
        shards[action.index] = (action.start, action.end, members, skipped)


@pytest.mark.parametrize("seed", range(40))
def test_cursor_matches_a_plain_loop(seed):
    """Any clip count, failure pattern, shard size and task size give the plain loop's shards, in order."""
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    failed = [rng.random() < rng.choice([0.0, 0.2, 0.6, 1.0]) for _ in range(n)]
    per_shard, per_task = rng.randint(1, 7), rng.randint(1, 9)
    shards, trailing, chunks = _drive(plan_gaps([], n), failed, per_shard, per_task)
    expected, expected_trailing = _reference(failed, per_shard)
    assert [shards[i] for i in sorted(shards)] == expected and sorted(shards) == list(range(len(expected)))
    assert trailing == expected_trailing
    assert [(c.start, c.end) for c in chunks] == [(s, min(s + per_task, n)) for s in range(0, n, per_task)]


class _Record:
    def __init__(self, index, start, end):
        self.index, self.start, self.end = index, start, end


@pytest.mark.parametrize("seed", range(40))
def test_resumed_gaps_give_the_missing_shards_exactly(seed):
    """With any subset of the shards already done, the cursor over the gaps writes exactly the other shards, each as
    the uninterrupted run wrote it."""
    rng = random.Random(1000 + seed)
    n = rng.randint(1, 60)
    failed = [rng.random() < 0.3 for _ in range(n)]
    per_shard, per_task = rng.randint(1, 6), rng.randint(1, 8)
    expected, expected_trailing = _reference(failed, per_shard)
    done = sorted(rng.sample(range(len(expected)), rng.randint(0, len(expected))))
    records = [_Record(i, expected[i][0], expected[i][1]) for i in done]
    shards, trailing, chunks = _drive(plan_gaps(records, n), failed, per_shard, per_task)
    assert shards == {i: s for i, s in enumerate(expected) if i not in done}
    covered = {p for r in records for p in range(r.start, r.end)}
    assert sorted(p for c in chunks for p in range(c.start, c.end)) == sorted(set(range(n)) - covered)
    assert trailing == expected_trailing


def test_changed_audio_inside_a_gap_is_refused():
    """A clip that failed in the first run but reads now shifts the shard boundaries: the gap no longer ends where the
    next recorded shard begins, and resuming is refused."""
    failed = [False, True, False, False, False, False]
    expected, _ = _reference(failed, 2)  # shards [0, 3) [3, 5) [5, 6)
    gaps = plan_gaps([_Record(1, expected[1][0], expected[1][1])], len(failed))
    assert gaps == [Gap(0, 3, 0, 1), Gap(5, 6, 2, None)]
    _drive(gaps, failed, 2, 2)  # the same outcomes resume fine
    with pytest.raises(ResumeMismatch, match=r"now fill shards up to index 1 \(\+1 samples\).*recorded there is 1"):
        _drive(gaps, [False] * 6, 2, 2)
