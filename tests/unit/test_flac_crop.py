"""Window decoding of FLAC clips (relret.flac_crop) against full decoding, and its crop draw against random_crop."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile

from relret import shard_format
from relret.flac_crop import PCM_FULL_SCALE, crop_window, decode_flac_window, flac_frames, flac_info, read_flac_window
from relret.tar_member import ShardFile, TarMember

SR = shard_format.SAMPLE_RATE_HZ
BLOCK = 4096  # libsndfile's FLAC block size (checked in test_clips_use_the_block_size_the_tests_aim_at)


def _signal(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / SR
    if kind == "noise":
        return 0.3 * rng.standard_normal(n)
    if kind == "tone":
        return 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.2 * np.sin(2 * np.pi * 3001.0 * t)
    # Silence, a tone, full-scale clipping and noise one after another: FLAC picks constant, fixed, LPC and verbatim
    # subframes for them, so seeks land in frames of every kind.
    out = np.zeros(n)
    q = n // 4
    out[q : 2 * q] = 0.8 * np.sin(2 * np.pi * 97.0 * t[q : 2 * q])
    out[2 * q : 3 * q] = 1.5 * np.sign(np.sin(2 * np.pi * 50.0 * t[2 * q : 3 * q]))
    out[3 * q :] = rng.uniform(-1, 1, n - 3 * q)
    return out


# (seconds, kind): lengths that are and are not whole numbers of blocks, from shorter than 4 blocks to past 30 s.
CLIPS = [(0.5, "noise"), (4.1, "tone"), (10.0, "mixed"), (31.0, "noise"), (BLOCK * 5 / SR, "tone"), (1 / SR, "noise")]


@pytest.fixture(scope="module", params=CLIPS, ids=[f"{s:.4g}s-{k}" for s, k in CLIPS])
def clip(request) -> tuple[bytes, np.ndarray]:
    seconds, kind = request.param
    n = round(seconds * SR)
    rng = np.random.default_rng(n)
    data = shard_format.encode_flac(_signal(kind, n, rng).astype(np.float32))
    full, sr = shard_format.decode_flac(data)
    assert sr == SR and len(full) == n
    return data, full


def _windows(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, frames) pairs: the edges, every block boundary crossed closely, and random ones."""
    out = [(0, 0), (0, 1), (0, n), (0, n + 1), (0, 10 * n), (n - 1, 1), (n - 1, 5), (n, 1), (n, 0), (n + 3, 7)]
    out += [(s, n - s) for s in (1, n // 2, n - 2) if 0 <= s < n]  # ending exactly at the end
    for boundary in range(BLOCK, n, BLOCK):
        out += [(boundary - 1, 2), (boundary, 1), (boundary - 1, 1), (boundary - 100, BLOCK + 200), (boundary, BLOCK)]
    for _ in range(60):
        start = int(rng.integers(0, n + 1))
        out.append((start, int(rng.integers(0, n + 2))))  # often longer than the remainder
        out.append((start, int(rng.integers(1, min(n, 3 * SR) + 1))))
    return out


def test_window_equals_full_decode_sliced(clip):
    """Every window is sample-exact the full decode's slice: edges, block boundaries, past the end, random."""
    data, full = clip
    rng = np.random.default_rng(len(full))
    for start, frames in _windows(len(full), rng):
        got = decode_flac_window(data, start, frames)
        want = full[start : start + frames]
        assert got.dtype == np.float32 and got.ndim == 1, (start, frames)
        assert len(got) == len(want), (start, frames, len(got), len(want))
        assert np.array_equal(got, want), (start, frames)


def test_pcm_window_is_the_float_window_exactly(clip):
    """read_flac_window's int16 PCM / 32768 is, bit for bit, the full float decode's slice: every window of
    test_window_equals_full_decode_sliced, into a longer reused buffer whose other samples it leaves alone."""
    data, full = clip
    rng = np.random.default_rng(len(full) + 1)
    buffer = np.full(len(full) + 64, 12345, dtype=np.int16)
    for start, frames in _windows(len(full), rng):
        frames = min(frames, len(buffer))
        buffer[:] = 12345
        got = read_flac_window(data, start, buffer[:frames])
        want = full[start : start + frames]
        assert got.dtype == np.int16 and len(got) == len(want), (start, frames)
        assert np.shares_memory(got, buffer) or len(got) == 0
        assert np.array_equal(got.astype(np.float32) / PCM_FULL_SCALE, want), (start, frames)
        assert (buffer[len(got) :] == 12345).all(), (start, frames)


def test_pcm_window_refuses_what_it_cannot_read_exactly():
    """Stereo and 24-bit FLAC (not what shard_format writes) and an out that is not an int16 vector are refused
    naming the problem; a truncated stream raises as decode_flac_window does."""
    rng = np.random.default_rng(4)
    out = np.zeros(SR, dtype=np.int16)
    with pytest.raises(ValueError, match="2 channel.*mono 16-bit"):
        read_flac_window(_encode_any(0.1 * rng.standard_normal((SR, 2)), SR), 0, out)
    with pytest.raises(ValueError, match="24 bits.*mono 16-bit"):
        read_flac_window(_encode_any(0.1 * rng.standard_normal(SR), SR, "PCM_24"), 0, out)
    data = shard_format.encode_flac(np.zeros(2 * SR, dtype=np.float32))
    for bad in (np.zeros(10, np.float32), np.zeros((2, 10), np.int16), np.zeros(20, np.int16)[::2]):
        with pytest.raises(ValueError, match="C-contiguous int16 vector"):
            read_flac_window(data, 0, bad)
    with pytest.raises(ValueError, match="must be >= 0"):
        read_flac_window(data, -1, out)
    noisy = shard_format.encode_flac(rng.uniform(-1, 1, 4 * SR).astype(np.float32))
    with pytest.raises((ValueError, soundfile.LibsndfileError)):
        read_flac_window(noisy[: len(noisy) // 2], 3 * SR, out)


def _in_a_tar(tmp_path, data: bytes) -> TarMember:
    """`data` as a member of a tar between two other members, as a TarMember."""
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name, content in (("a.json", b"{}" * 300), ("a.flac", data), ("b.json", b"[]")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    with tarfile.open(path) as tar:
        member = tar.getmember("a.flac")
    return TarMember(ShardFile(str(path)), member.offset_data, member.size)


def test_windows_of_a_tar_member_equal_the_windows_of_its_bytes(clip, tmp_path):
    """Read on demand from a local shard (only what libsndfile asks for), every window and the header are what the
    same bytes in memory give: the PCM window, the float window and flac_info."""
    data, full = clip
    member = _in_a_tar(tmp_path, data)
    assert member.read() == data and flac_info(member) == flac_info(data)
    rng = np.random.default_rng(len(full) + 2)
    got, want = np.zeros(len(full) + 64, np.int16), np.zeros(len(full) + 64, np.int16)
    for start, frames in _windows(len(full), rng)[::3]:
        frames = min(frames, len(got))
        a, b = read_flac_window(member, start, got[:frames]), read_flac_window(data, start, want[:frames])
        assert np.array_equal(a, b) and len(a) == len(full[start : start + frames]), (start, frames)
        assert np.array_equal(decode_flac_window(member, start, frames), full[start : start + frames]), (start, frames)


def test_header_gives_frames_and_rate(clip):
    """flac_frames/flac_info read the length and rate from the header, equal to the decoded length."""
    data, full = clip
    assert flac_frames(data) == len(full)
    assert flac_info(data) == (len(full), SR, 1, 16)


def test_clips_use_the_block_size_the_tests_aim_at():
    """encode_flac writes 4096-frame blocks, so the boundary windows above really cross FLAC frames."""
    data = shard_format.encode_flac(np.zeros(3 * SR, dtype=np.float32))
    min_block, max_block = int.from_bytes(data[8:10], "big"), int.from_bytes(data[10:12], "big")
    assert (min_block, max_block) == (BLOCK, BLOCK)


def _encode_any(audio: np.ndarray, sample_rate_hz: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, audio, sample_rate_hz, format="FLAC", subtype=subtype)
    return buf.getvalue()


def test_stereo_windows_average_channels_like_decode_flac():
    """A stereo FLAC (not in our shards) gives the channel mean, equal to decode_flac's, window by window."""
    rng = np.random.default_rng(3)
    n = 3 * SR + 777
    stereo = np.stack([0.4 * rng.standard_normal(n), rng.uniform(-1, 1, n)], axis=1)
    data = _encode_any(stereo, SR)
    full, _ = shard_format.decode_flac(data)
    assert flac_info(data) == (n, SR, 2, 16)
    for start, frames in _windows(n, rng):
        assert np.array_equal(decode_flac_window(data, start, frames), full[start : start + frames]), (start, frames)


def test_header_of_other_rates_and_channel_counts():
    """flac_info agrees with libsndfile on rate, channels and length of files not written by encode_flac."""
    for rate, channels, n, subtype, bits in [
        (44_100, 1, 44_100 * 2 + 5, "PCM_16", 16),
        (48_000, 2, 4000, "PCM_24", 24),
        (16_000, 6, 1, "PCM_S8", 8),
    ]:
        data = _encode_any(np.zeros((n, channels)), rate, subtype)
        info = soundfile.info(io.BytesIO(data))
        assert info.subtype == subtype
        assert flac_info(data) == (info.frames, info.samplerate, info.channels, bits) == (n, rate, channels, bits)


def test_bad_input_is_refused():
    """Negative windows, non-FLAC bytes, headers without a length and truncated streams raise, naming the problem."""
    data = shard_format.encode_flac(np.zeros(2 * SR, dtype=np.float32))
    with pytest.raises(ValueError, match="must be >= 0"):
        decode_flac_window(data, -1, 10)
    with pytest.raises(ValueError, match="must be >= 0"):
        decode_flac_window(data, 0, -10)
    with pytest.raises(ValueError, match="not FLAC data"):
        flac_frames(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(40))
    with pytest.raises(ValueError, match="not FLAC data"):
        flac_frames(b"fLaC")
    unknown = bytearray(data)
    packed = int.from_bytes(unknown[18:26], "big") & ~((1 << 36) - 1)
    unknown[18:26] = packed.to_bytes(8, "big")
    with pytest.raises(ValueError, match="does not record the stream's length"):
        flac_frames(bytes(unknown))
    noisy = shard_format.encode_flac(np.random.default_rng(0).uniform(-1, 1, 4 * SR).astype(np.float32))
    cut = noisy[: len(noisy) // 2]
    with pytest.raises((ValueError, soundfile.LibsndfileError)):
        decode_flac_window(cut, 3 * SR, SR)  # a window beyond the cut: full decoding raises on it too
    with pytest.raises(soundfile.LibsndfileError):
        shard_format.decode_flac(cut)


# ---------------------------------------------------------------------------------------------------------------------
# The crop draw


def _reference_random_crop(audio: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """relret.data.random_crop as it was when window decoding came in (the draw the training streams have made)."""
    if len(audio) <= max_samples:
        return audio
    start = int(rng.integers(0, len(audio) - max_samples + 1))
    return audio[start : start + max_samples]


def _check_same_draws(random_crop) -> None:
    for max_frames in (1, 7, 320_000, 960_000):
        lengths = {0, 1, max_frames - 1, max_frames, max_frames + 1, 2 * max_frames, 3 * max_frames + 12_345}
        for n in sorted(lengths):
            audio = np.arange(n, dtype=np.float32)
            for seed in range(25):
                rng_old, rng_new = np.random.default_rng([seed, n]), np.random.default_rng([seed, n])
                want = random_crop(audio, max_frames, rng_old)
                start, length = crop_window(n, max_frames, rng_new)
                assert np.array_equal(audio[start : start + length], want), (max_frames, n, seed)
                assert length == len(want) and 0 <= start and start + length <= n
                assert rng_new.integers(1 << 62) == rng_old.integers(1 << 62), (max_frames, n, seed)


def test_crop_window_draws_what_random_crop_draws():
    """Same generator in, same window out and the same generator state after (the stream stays reproducible)."""
    _check_same_draws(_reference_random_crop)


def test_crop_window_covers_every_start():
    """Starts are uniform over 0 .. n - max (both ends reachable), as random_crop's were."""
    rng = np.random.default_rng(0)
    starts = {crop_window(10, 7, rng)[0] for _ in range(400)}
    assert starts == {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------------------------------------
# duration_s against the header


def test_json_duration_gives_the_header_frame_count(tmp_path):
    """Clips written by the shard job's audio path: round(duration_s * 32000) from the json equals the FLAC header's
    frame count (and the decoded length), for several input rates and lengths."""
    from shards.job import encode_clips
    from shards.readers import ClipSpec

    rng = np.random.default_rng(1)
    specs = []
    for i, (rate, seconds) in enumerate([(44_100, 15.37), (32_000, 4.1), (48_000, 29.99), (22_050, 0.5), (44_100, 31)]):
        name = f"clip{i}.wav"
        soundfile.write(tmp_path / name, 0.2 * rng.standard_normal(int(seconds * rate)), rate, subtype="PCM_16")
        specs.append(ClipSpec(source=name, audio_path=name, captions=("a caption",)))
    statuses, encoded = encode_clips(specs, str(tmp_path), "clotho", "development", max_duration_s=30.0)
    assert statuses == [None] * len(specs)
    for meta_fields, flac in encoded:
        meta = shard_format.SampleMeta(**json.loads(json.dumps(meta_fields)))  # through the json member, as stored
        n = flac_frames(flac)
        assert round(meta.duration_s * SR) == n == len(shard_format.decode_flac(flac)[0])
    assert dataclasses.asdict(shard_format.SampleMeta(**encoded[-1][0]))["duration_s"] == 30.0


def test_duration_arithmetic_is_exact_up_to_an_hour():
    """n / 32000 as a float, through json, times 32000, rounds back to n for every n up to an hour (random: 2 h)."""
    for lo in range(0, 3600 * SR, 8_000_000):
        n = np.arange(lo, min(lo + 8_000_000, 3600 * SR), dtype=np.int64)
        assert np.array_equal(np.rint((n / SR) * SR).astype(np.int64), n)
    for n in np.random.default_rng(0).integers(0, 2 * 3600 * SR, 2000):
        assert round(json.loads(json.dumps(int(n) / SR)) * SR) == n
