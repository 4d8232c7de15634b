"""Tar members read on demand (relret.tar_member) against tarfile's own reads and an in-memory file."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from relret import tar_member
from relret.tar_member import ShardChanged, ShardFile, TarMember


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _members(path) -> dict[str, TarMember]:
    shard = ShardFile(str(path))
    with tarfile.open(path) as tar:
        return {m.name: TarMember(shard, m.offset_data, m.size) for m in tar}


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


def test_a_shard_replaced_by_a_rename_reads_what_was_listed(shard, tmp_path):
    """shards/ writes by rename: members listed before still read the bytes that were listed (the open file), not
    the new file's bytes at the old offsets."""
    path, contents = shard
    member = _members(path)["k0.flac"]
    other = tmp_path / "other.tar"
    _tar(other, {"z.json": b"{}" * 5000, **{k: v[::-1] for k, v in contents.items()}})
    os.replace(other, path)
    assert member.read() == contents["k0.flac"]


def test_a_shard_rewritten_in_place_or_cut_is_refused(shard):
    """Rewritten in place (same size, a new modification time) or cut after opening: the member is not read at
    offsets found in the old content; the shard's size is checked against each member."""
    path, contents = shard
    member = _members(path)["k0.flac"]
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(member.offset)
        f.write(b"\0" * 10)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(ShardChanged, match="changed since its members were listed"):
        member.read(5)
    member = _members(path)["k0.flac"]
    with member.open() as f:  # cut after the member was opened: the read comes up short
        os.truncate(path, member.offset + 100)
        with pytest.raises(ShardChanged, match="ended .* early"):
            f.read()
    with pytest.raises(ValueError, match="lie outside"):
        TarMember(ShardFile(str(path)), 0, 10**9)


def test_one_descriptor_per_shard_closed_with_its_last_member(shard):
    """Members share their shard's one open file, whatever their reads; it closes when the last member goes."""
    path, _ = shard
    before = len(os.listdir("/proc/self/fd"))
    members = _members(path)
    assert len({id(m.shard) for m in members.values()}) == 1
    for _ in range(20):
        for m in members.values():
            with m.open() as f:
                f.read(10)
    assert len(os.listdir("/proc/self/fd")) == before + 1 and ShardFile.open_count >= 1
    count = ShardFile.open_count
    del members, m
    assert len(os.listdir("/proc/self/fd")) == before and ShardFile.open_count == count - 1


def test_past_the_open_shard_limit_clips_come_as_bytes(tmp_path, monkeypatch, capfd):
    """When a process already holds MAX_OPEN_SHARD_FILES shards open, the reader keeps further clips as bytes (with
    one warning) instead of running out of file descriptors; the samples are the same."""
    from relret.data import DamageCounter, _shard_samples

    path = tmp_path / "s.tar"
    _tar(path, {"a.flac": b"x" * 3000, "a.json": b"{}", "b.flac": b"y" * 10, "b.json": b"[]"})
    lazy = list(_shard_samples(str(path), DamageCounter("test")))
    monkeypatch.setattr(tar_member, "MAX_OPEN_SHARD_FILES", 0)
    eager = list(_shard_samples(str(path), DamageCounter("test")))
    assert [type(s["flac"]) for s in lazy] == [TarMember, TarMember] and [type(s["flac"]) for s in eager] == [bytes] * 2
    assert [s["flac"].read() for s in lazy] == [s["flac"] for s in eager] == [b"x" * 3000, b"y" * 10]
    assert "further clips are held as bytes" in capfd.readouterr().err
