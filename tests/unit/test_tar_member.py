"""Tar members read on demand (relret.tar_member) against tarfile's own reads and an in-memory file."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from relret.tar_member import FileStamp, ShardChanged, TarMember


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _members(path) -> dict[str, TarMember]:
    stamp = FileStamp.of(os.stat(path))
    with tarfile.open(path) as tar:
        return {m.name: TarMember(str(path), m.offset_data, m.size, stamp) for m in tar}


@pytest.fixture
def shard(tmp_path):
    rng = np.random.default_rng(0)
    contents = {f"k{i}.{ext}": rng.bytes(n) for i, (ext, n) in enumerate([("flac", 70_001), ("json", 3), ("x", 0)])}
    contents["k3.flac"] = rng.bytes(512)
    path = tmp_path / "s.tar"
    _tar(path, contents)
    return path, contents


def test_members_read_what_tarfile_reads(shard):
    """Each member's bytes (all, and its first n) are tarfile's bytes for it, empty members included."""
    path, contents = shard
    members = _members(path)
    assert set(members) == set(contents)
    for name, member in members.items():
        assert len(member) == len(contents[name])
        assert member.read() == contents[name]
        assert member.read(10) == contents[name][:10]


def test_reader_seeks_and_reads_like_an_in_memory_file(shard):
    """Random seeks (from the start, the current position and the end, past the end) and reads give the bytes and
    positions io.BytesIO gives over the same member."""
    path, contents = shard
    rng = np.random.default_rng(1)
    data = contents["k0.flac"]
    with _members(path)["k0.flac"].open() as f:
        ref = io.BytesIO(data)
        for _ in range(300):
            whence = int(rng.integers(3))
            pos = int(rng.integers(-len(data), len(data) + 50)) if whence else int(rng.integers(0, len(data) + 50))
            if whence == io.SEEK_CUR:
                pos = max(pos, -ref.tell())
            if whence == io.SEEK_END:
                pos = max(pos, -len(data))
            assert f.seek(pos, whence) == ref.seek(pos, whence)
            n = int(rng.integers(0, 9000))
            assert f.read(n) == ref.read(n)
            buffer = bytearray(int(rng.integers(0, 5000)))
            assert f.readinto(buffer) == ref.readinto(buffer)
            assert f.tell() == ref.tell()
        with pytest.raises(ValueError, match="negative seek"):
            f.seek(-1)


def test_a_shard_changed_after_listing_is_refused(shard, tmp_path):
    """Replaced (another file renamed over it, same bytes), rewritten in place (same size) or cut: the member is not
    read at offsets found in the old file."""
    path, contents = shard
    member = _members(path)["k0.flac"]
    copy = tmp_path / "copy.tar"
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # another inode: same content, but nothing says so
    with pytest.raises(ShardChanged, match="changed since its members were listed"):
        member.read()
    member = _members(path)["k0.flac"]
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(member.offset)
        f.write(b"\0" * 10)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(ShardChanged, match="changed since"):
        member.read(5)
    member = _members(path)["k0.flac"]
    with member.open() as f:  # cut after the member was opened: the read comes up short
        os.truncate(path, member.offset + 100)
        with pytest.raises(ShardChanged, match="ended .* early"):
            f.read()
    with pytest.raises(ValueError, match="lie outside"):
        TarMember(str(path), 0, 10**9, FileStamp.of(os.stat(path)))


def test_reader_closes_its_descriptor(shard):
    """Every open() is closed with its reader, also when the shard has changed."""
    path, _ = shard
    member = _members(path)["k0.flac"]
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with member.open() as f:
            f.read(10)
    os.utime(path, ns=(0, 0))
    for _ in range(50):
        with pytest.raises(ShardChanged):
            member.open()
    assert len(os.listdir("/proc/self/fd")) == before
