"""The shard cursor: which clips fill which shard, decided from the audio tasks' outcomes alone (no Ray here).

The job orders its clips once; a shard takes the next `samples_per_shard` clips whose audio could be used, and the
clips skipped on the way belong to the shard whose range [start, end) of positions covers them. So shard boundaries
depend only on the clip order and on which clips fail, and a rerun that redoes the positions no verified shard covers
(the `Gap`s) writes exactly the shards a run without a crash would have written.

The cursor cuts the gaps into audio tasks (`Chunk`s, in order), takes each task's outcome per clip (None: encoded,
or the SkippedInput), and answers with what the shard writers must do: `BeginShard`, `AddSamples` (clips of that
task, by offset), `FinishShard` (with the shard's range and skipped clips, which become its progress record). The Ray
dispatcher in `shards/job.py` only carries these out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from relret.shard_format import SkippedInput


class ResumeMismatch(RuntimeError):
    """The output directory holds shards that this job's inputs do not reproduce."""


@dataclasses.dataclass
class Gap:
    """Positions [start, end) no verified shard covers; they fill shards from `first_index` on, and must end exactly
    at shard `next_index` (None: the end of the clip list)."""

    start: int
    end: int
    first_index: int
    next_index: int | None


def plan_gaps(records: Sequence[Any], n_clips: int) -> list[Gap]:
    """The stretches of the clip order still to process, given the verified progress records (`index`, `start`,
    `end`; sorted by index)."""
    gaps, pos, index = [], 0, 0
    for r in records:
        if (r.start > pos) != (r.index > index) or r.start < pos or r.index < index or r.end <= r.start:
            raise ResumeMismatch(
                f"progress records do not tile the clip order (shard {r.index} covers [{r.start}, {r.end}) after "
                f"position {pos}, shard {index})"
            )
        if r.start > pos:
            gaps.append(Gap(pos, r.start, index, r.index))
        pos, index = r.end, r.index + 1
    if pos > n_clips:
        raise ResumeMismatch(f"progress records cover {pos} clips, the inputs have {n_clips}")
    if pos < n_clips or not records:
        gaps.append(Gap(pos, n_clips, index, None))
    return gaps


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One audio task: positions [start, end) of the clip order, all within gap number `gap`."""

    gap: int
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class BeginShard:
    """Start writing shard `index` (its first sample follows)."""

    index: int


@dataclasses.dataclass(frozen=True)
class AddSamples:
    """Append to shard `index` the clips at these offsets of the chunk just fed, in order."""

    index: int
    offsets: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FinishShard:
    """Shard `index` is complete: `samples` samples from positions [start, end), where `skipped` were left out."""

    index: int
    samples: int
    start: int
    end: int
    skipped: tuple[SkippedInput, ...]

    def record(self, fingerprint: str) -> dict[str, Any]:
        """The shard's progress record as the writer stores it (it adds the shard's bytes, sha256 and dimension)."""
        return {
            "fingerprint": fingerprint,
            "index": self.index,
            "start": self.start,
            "end": self.end,
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
        }


Action = BeginShard | AddSamples | FinishShard


class ShardCursor:
    """Assigns the clips of the gaps to shards as the audio tasks' outcomes arrive, in clip order.

    Use: `for chunk in cursor.chunks(): ... actions = cursor.feed(chunk, outcomes)`, then `cursor.close()`. Chunks
    must be fed in the order `chunks()` yields them (the dispatcher may submit ahead, but feeds in order)."""

    def __init__(self, gaps: Sequence[Gap], samples_per_shard: int, clips_per_task: int) -> None:
        assert samples_per_shard >= 1 and clips_per_task >= 1
        self.gaps = list(gaps)
        self.samples_per_shard = samples_per_shard
        self.clips_per_task = clips_per_task
        self.skipped: list[SkippedInput] = []
        """Every clip fed as skipped, in clip order."""
        self.trailing: list[SkippedInput] = []
        """Clips skipped after the last sample of the clip list (no shard's range covers them); set by `close`."""
        self._gap_no = -1
        self._next = 0
        self._index = 0
        self._count = 0
        self._shard_start = 0
        self._shard_skipped: list[SkippedInput] = []

    @property
    def todo(self) -> int:
        """Positions the gaps hold."""
        return sum(g.end - g.start for g in self.gaps)

    def chunks(self) -> Iterator[Chunk]:
        """The audio tasks, in clip order: each gap cut into pieces of at most `clips_per_task` positions."""
        for gap_no, gap in enumerate(self.gaps):
            for start in range(gap.start, gap.end, self.clips_per_task):
                yield Chunk(gap_no, start, min(start + self.clips_per_task, gap.end))

    def feed(self, chunk: Chunk, outcomes: Sequence[SkippedInput | None]) -> list[Action]:
        """The writer actions for a chunk's outcomes (per clip, None if its sample can be written, else why not)."""
        assert len(outcomes) == chunk.end - chunk.start, "one outcome per clip of the chunk"
        if chunk.gap != self._gap_no:
            if self._gap_no >= 0:
                self._check_gap_end()
            self._gap_no, gap = chunk.gap, self.gaps[chunk.gap]
            self._index, self._count, self._shard_start, self._shard_skipped = gap.first_index, 0, gap.start, []
            self._next = gap.start
        assert chunk.start == self._next, f"chunk at {chunk.start} fed out of order (expected {self._next})"
        self._next = chunk.end
        actions: list[Action] = []
        offsets: list[int] = []
        for j, skip in enumerate(outcomes):
            if skip is not None:
                self._shard_skipped.append(skip)
                self.skipped.append(skip)
                continue
            if self._count == 0:
                actions.append(BeginShard(self._index))
            offsets.append(j)
            self._count += 1
            if self._count == self.samples_per_shard:
                actions.append(AddSamples(self._index, tuple(offsets)))
                actions.append(self._finish(chunk.start + j + 1))
                offsets = []
        if offsets:
            actions.append(AddSamples(self._index, tuple(offsets)))
        return actions

    def close(self) -> list[Action]:
        """After the last chunk: finish the shard the clip list ends in (if it has samples), or check that the last
        gap ended exactly where the next verified shard begins."""
        if self._gap_no < 0:
            return []
        assert self._next == self.gaps[self._gap_no].end and self._gap_no == len(self.gaps) - 1, "every chunk was fed"
        gap = self.gaps[self._gap_no]
        if gap.next_index is not None:
            self._check_gap_end()
            return []
        if self._count == 0:
            self.trailing = self._shard_skipped
            return []
        return [self._finish(gap.end)]

    def _finish(self, end: int) -> FinishShard:
        done = FinishShard(self._index, self._count, self._shard_start, end, tuple(self._shard_skipped))
        self._index, self._count, self._shard_start, self._shard_skipped = self._index + 1, 0, end, []
        return done

    def _check_gap_end(self) -> None:
        gap = self.gaps[self._gap_no]
        if self._count != 0 or self._shard_skipped or self._index != gap.next_index:
            raise ResumeMismatch(
                f"resuming: the clips before position {gap.end} now fill shards up to index {self._index} "
                f"(+{self._count} samples), but the shard recorded there is {gap.next_index}. Audio files changed since "
                "the first run (a clip that failed reads now, or the reverse): write to a new --out, or delete the old "
                "one to rebuild"
            )
