"""A member of a local tar shard, read on demand.

The training stream's shuffle buffer holds a thousand samples or more per DataLoader worker (`data.shuffle_buffer`).
Holding each clip's FLAC bytes there costs gigabytes per worker for minute-long WavCaps clips (1,000 x 3.8 MB), and
reading a whole member to decode a 10 or 30 s crop of it pays for bytes that are never used. A `TarMember` is the
member's place in its shard (data offset, size) and the shard's open file (`ShardFile`); the crop decoder reads
through `TarMember.open()` only what libsndfile asks for.

A shard is opened once per read of it, as when it is streamed, and the file stays open while any of its members is
held (the shuffle buffer lets them go as it yields them): on a shared file system (Lustre, GPFS, NFS) the metadata
server sees one open per shard, never one per sample. Reads go to the open file, so a shard replaced by a rename
(how `shards/` writes) still reads the bytes that were listed; a shard rewritten in place or cut is refused
(`ShardChanged`, a ValueError: the sample is counted as bad) instead of read at offsets that no longer hold the member.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

READ_BUFFER_BYTES = 1 << 18
"""Read-ahead of `TarMember.open()`. libFLAC asks for 8 KiB at a time and libsndfile for the position about as often;
served from a C buffer instead of a system call and a Python method each. Measured side by side (decoding 10 and 30 s
crops of 15-120 s clips; `bench/loader.py` prints it as "crop from the shard"): 0.97-1.05 of the rate from bytes in
memory buffered, 0.93-0.97 unbuffered."""

MAX_OPEN_SHARD_FILES = 256
"""Shard files one process keeps open for their members at most. A shuffle buffer spans buffer / (samples per shard)
shards, a handful for real shards; past this many (shards of a few samples against a large buffer) the reader keeps a
shard's clips as bytes instead (`ShardFile.too_many_open`), rather than running out of file descriptors."""


class ShardChanged(ValueError):
    """The shard file is not as it was listed: rewritten in place or cut since its members were found."""


class FileStamp(NamedTuple):
    """What tells that an open file's content is still what it was (its identity cannot change: it is open)."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_size, st.st_mtime_ns)


class ShardFile:
    """A local shard open for reading, shared by the `TarMember`s listed from it, and closed when the last reference
    to it goes (or by `close`)."""

    open_count = 0
    """ShardFiles of this process not yet closed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        ShardFile.open_count += 1
        self.stamp = FileStamp.of(os.fstat(self.fd))

    @staticmethod
    def too_many_open() -> bool:
        return ShardFile.open_count >= MAX_OPEN_SHARD_FILES

    def check(self) -> None:
        """Raise ShardChanged when the open file's size or modification time is no longer what it was at opening."""
        now = FileStamp.of(os.fstat(self.fd))
        if now != self.stamp:
            raise ShardChanged(
                f"{self.path} changed since its members were listed ({self.stamp} then, {now} now): shards must not "
                "be rewritten while a job reads them; write new shards to a new directory"
            )

    def close(self, _os_close=os.close) -> None:  # os.close bound early: __del__ may run at interpreter exit
        if self.fd >= 0:
            _os_close(self.fd)
            self.fd = -1
            type(self).open_count -= 1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()


class TarMember:
    """Bytes `offset .. offset + size - 1` of an open shard file."""

    __slots__ = ("shard", "offset", "size")

    def __init__(self, shard: ShardFile, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > shard.stamp.size:
            raise ValueError(
                f"member bytes {offset}..{offset + size - 1} lie outside {shard.path} ({shard.stamp.size} bytes)"
            )
        self.shard, self.offset, self.size = shard, offset, size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"TarMember({self.shard.path!r}, offset={self.offset}, size={self.size})"

    def _reader(self) -> MemberReader:
        if self.shard.fd < 0:
            raise ValueError(f"{self.shard.path} was closed while its members were still in use")
        self.shard.check()
        return MemberReader(self.shard, self.offset, self.size)

    def open(self) -> io.BufferedReader:
        """A read-only, seekable binary file of the member's bytes, buffered (`READ_BUFFER_BYTES`). Raises
        ShardChanged when the shard has been rewritten in place or cut since it was opened."""
        return io.BufferedReader(self._reader(), READ_BUFFER_BYTES)

    def read(self, n: int = -1) -> bytes:
        """The member's first `n` bytes (all of them when n < 0), in one read of just those bytes (a FLAC header is
        42 bytes: no read-ahead)."""
        with self._reader() as f:
            return f.read(self.size if n < 0 else min(n, self.size))


class MemberReader(io.RawIOBase):
    """A seekable, read-only view of bytes `offset .. offset + size - 1` of an open shard file. Reads are `os.preadv`
    straight into the caller's buffer (no shared file position: readers of one shard do not disturb each other);
    closing it leaves the shard open."""

    def __init__(self, shard: ShardFile, offset: int, size: int) -> None:
        super().__init__()
        self._shard, self._offset, self._size, self._pos = shard, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("read from a closed member")
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._shard.fd, [view[:n]], self._offset + self._pos)
        if got < n:  # the file is shorter than when it was listed
            raise ShardChanged(
                f"{self._shard.path} ended {n - got} bytes early inside a member: it was cut after it was listed"
            )
        self._pos += got
        return got

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        super().close()
        self._shard = None  # a closed reader keeps no shard open
