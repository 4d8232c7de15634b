"""A member of a local tar shard, read on demand.

The training stream's shuffle buffer holds a thousand samples or more per DataLoader worker (`data.shuffle_buffer`).
Holding each clip's FLAC bytes there costs gigabytes per worker for minute-long WavCaps clips (1,000 x 3.8 MB), and
reading a whole member to decode a 10 or 30 s crop of it pays for bytes that are never used. A `TarMember` is the
member's place in its shard (path, data offset, size) and the shard file's identity when it was listed; the crop
decoder reads through `TarMember.open()` only what libsndfile asks for. A shard file rewritten or replaced since it was
listed is refused (`ShardChanged`, a ValueError: the sample is counted as bad) instead of read at offsets that no
longer hold the member.
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


class ShardChanged(ValueError):
    """The shard file is not the one that was listed: replaced, rewritten or cut since its members were read."""


class FileStamp(NamedTuple):
    """What identifies a file's content well enough to read it at offsets found earlier."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TarMember:
    """Bytes `offset .. offset + size - 1` of the local file `path`, which had `stamp` when it was listed."""

    __slots__ = ("path", "offset", "size", "stamp")

    def __init__(self, path: str, offset: int, size: int, stamp: FileStamp) -> None:
        if offset < 0 or size < 0 or offset + size > stamp.size:
            raise ValueError(f"member bytes {offset}..{offset + size - 1} lie outside {path} ({stamp.size} bytes)")
        self.path, self.offset, self.size, self.stamp = path, offset, size, stamp

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"TarMember({self.path!r}, offset={self.offset}, size={self.size})"

    def open(self) -> io.BufferedReader:
        """A read-only, seekable binary file of the member's bytes, buffered (`READ_BUFFER_BYTES`). Raises
        ShardChanged when the file at `path` is not the one listed (another inode, size or modification time)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            now = FileStamp.of(os.fstat(fd))
            if now != self.stamp:
                raise ShardChanged(
                    f"{self.path} changed since its members were listed ({self.stamp} then, {now} now): shards must "
                    "not be rewritten while a job reads them; write new shards to a new directory"
                )
            return io.BufferedReader(MemberReader(fd, self.offset, self.size), READ_BUFFER_BYTES)
        except BaseException:
            os.close(fd)
            raise

    def read(self, n: int = -1) -> bytes:
        """The member's first `n` bytes (all of them when n < 0)."""
        with self.open() as f:
            return f.read(n)


class MemberReader(io.RawIOBase):
    """A seekable, read-only view of bytes `offset .. offset + size - 1` of an open file descriptor, which it owns
    and closes. Reads are `os.preadv` straight into the caller's buffer: no shared file position, no copy."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [view[:n]], self._offset + self._pos)
        if got < n:  # the file is shorter than when it was listed
            raise ShardChanged(f"the shard file ended {n - got} bytes early inside a member: it was cut after listing")
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
        if not self.closed:
            os.close(self._fd)
        super().close()
