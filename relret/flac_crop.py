"""Decoding only a window of a FLAC clip, and drawing that window the way `relret.data.random_crop` draws it.

Training crops clips of up to 30 s (WavCaps: often minutes stored) and validation keeps the first `val_crop_s`
seconds, yet decoding the whole clip then slicing pays for every sample. Here the window is read straight from the
FLAC bytes: the frame count comes from the STREAMINFO header (no decoding), libsndfile seeks to the window's first
frame and decodes only as far as its end. The result is sample-for-sample what `shard_format.decode_flac` gives
sliced (tests/unit/test_flac_crop.py checks windows at the start, at the end, across FLAC frame boundaries and past the
end), and `crop_window` makes the same random draw as `random_crop`, so a seed gives the same crops either way.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np

from relret.tar_member import TarMember

FlacData = bytes | TarMember
"""FLAC bytes in memory, or a member of a local tar shard read on demand (only the parts a window needs)."""

_STREAMINFO_TYPE = 0
_STREAMINFO_BYTES = 34


class FlacInfo(NamedTuple):
    """What a FLAC stream's STREAMINFO block says about it."""

    frames: int
    """Samples per channel."""
    sample_rate_hz: int
    channels: int
    bits_per_sample: int


def flac_info(data: FlacData) -> FlacInfo:
    """Frame count, sample rate and channels from the STREAMINFO header of FLAC bytes, without decoding audio (of a
    `TarMember`, only the header is read).

    Raises ValueError when `data` does not start with a FLAC STREAMINFO block or the header leaves the length out
    (a streamed encoder may; `shard_format.encode_flac` always records it)."""
    # The FLAC format: "fLaC", then a 4-byte metadata block header (last-block flag and 7-bit type, 24-bit length),
    # and STREAMINFO must be the first block. Its bytes 10-17 pack sample rate (20 bits), channels - 1 (3),
    # bits per sample - 1 (5) and total samples per channel (36; 0 means unknown).
    if isinstance(data, TarMember):
        data = data.read(8 + _STREAMINFO_BYTES)
    if len(data) < 8 + _STREAMINFO_BYTES or data[:4] != b"fLaC":
        raise ValueError(f"not FLAC data (starts with {bytes(data[:4])!r}, {len(data)} bytes)")
    block_type, block_len = data[4] & 0x7F, int.from_bytes(data[5:8], "big")
    if block_type != _STREAMINFO_TYPE or block_len != _STREAMINFO_BYTES:
        raise ValueError(f"FLAC data without a STREAMINFO block first (block type {block_type}, {block_len} bytes)")
    packed = int.from_bytes(data[8 + 10 : 8 + 18], "big")
    frames = packed & ((1 << 36) - 1)
    if frames == 0:
        raise ValueError("the FLAC header does not record the stream's length (total samples 0)")
    return FlacInfo(
        frames=frames,
        sample_rate_hz=packed >> 44,
        channels=((packed >> 41) & 0x7) + 1,
        bits_per_sample=((packed >> 36) & 0x1F) + 1,
    )


def flac_frames(data: FlacData) -> int:
    """Frames (samples per channel) of FLAC bytes, read from the header: no audio is decoded."""
    return flac_info(data).frames


def _open(data: FlacData) -> io.BufferedIOBase:
    return data.open() if isinstance(data, TarMember) else io.BytesIO(data)


def _read_window(
    data: FlacData, start: int, frames: int, mono_pcm16: bool = False, **read_options
) -> np.ndarray | None:
    """Frames start .. start + frames - 1 of FLAC data, as far as the clip goes, read by libsndfile from the seek
    point with `SoundFile.read(**read_options)`; None when the window holds no frame. Raises ValueError when the
    stream ends before the header's length (truncated data), and with `mono_pcm16` when the stream is not mono 16-bit
    PCM."""
    import soundfile  # imported on use, like shard_format's codecs, so importing this module stays cheap

    with _open(data) as raw, soundfile.SoundFile(raw) as f:
        if mono_pcm16 and (f.channels != 1 or f.subtype != "PCM_16"):
            raise ValueError(
                f"FLAC data of {f.channels} channel(s) at {f.subtype.removeprefix('PCM_')} bits: the training stream "
                "reads mono 16-bit shards (shard_format.encode_flac); rewrite the shards with shards/build.py"
            )
        wanted = max(0, min(frames, f.frames - start))
        if wanted == 0:
            return None
        if start:
            f.seek(start)
        got = f.read(wanted, **read_options)
    if len(got) != wanted:
        raise ValueError(f"FLAC data is truncated: decoded {len(got)} of frames {start}..{start + wanted - 1}")
    return got


def decode_flac_window(data: FlacData, start: int, frames: int) -> np.ndarray:
    """float32 mono [min(frames, n - start)] (n: the clip's frames; empty when start >= n): frames start ..
    start + frames - 1 of FLAC bytes, decoding only those (channels averaged). Equal, sample for sample, to
    `shard_format.decode_flac(data)[0][start : start + frames]`.

    Raises ValueError for a negative start or frame count, and when the stream ends before the header's length
    (truncated data); libsndfile's own errors (soundfile.LibsndfileError, a RuntimeError) pass through."""
    if start < 0 or frames < 0:
        raise ValueError(f"start and frames must be >= 0, got start={start}, frames={frames}")
    audio = _read_window(data, start, frames, dtype="float32", always_2d=False)
    if audio is None:
        return np.zeros(0, dtype=np.float32)
    if audio.ndim != 1:
        audio = audio.mean(axis=1)  # the same reduction as decode_flac, so stereo windows match too
    return audio


PCM_FULL_SCALE = 32768
"""16-bit PCM sample -> float: sample / PCM_FULL_SCALE, exactly what libsndfile's float read of 16-bit FLAC gives
(a power of two: the division is exact)."""


def read_flac_window(data: FlacData, start: int, out: np.ndarray) -> np.ndarray:
    """Decode frames start .. start + len(out) - 1 of mono 16-bit FLAC bytes (what `shard_format.encode_flac` writes)
    into `out`, an int16 C-contiguous 1-d array, as PCM samples, decoding only those; returns the view of `out` that
    holds them: shorter than `out` when the clip ends first, empty when start >= the clip's frames.

    `read_flac_window(data, start, out) / PCM_FULL_SCALE` equals `decode_flac_window(data, start, len(out))` sample
    for sample, at half the bytes and with no allocation: the training stream decodes each crop into a buffer it
    reuses and ships int16 batches to the training process.

    Raises ValueError for a negative start, data that is not mono 16-bit FLAC (other shards: decode_flac_window),
    an `out` that is not a contiguous int16 vector, and a stream that ends before the header's length (truncated)."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if out.dtype != np.int16 or out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous int16 vector, got {out.dtype} of shape {out.shape}")
    got = _read_window(data, start, len(out), mono_pcm16=True, out=out)
    return out[:0] if got is None else got


def crop_window(n_frames: int, max_frames: int, rng: np.random.Generator) -> tuple[int, int]:
    """(start, length) of a random window of at most `max_frames` in a clip of `n_frames`: the whole clip when it is
    no longer, with no draw from `rng`; otherwise one `rng.integers(0, n_frames - max_frames + 1)`, exactly the draw
    `relret.data.random_crop` makes, so the same generator state gives the same window and the same state after."""
    if n_frames <= max_frames:
        return 0, n_frames
    start = int(rng.integers(0, n_frames - max_frames + 1))
    return start, max_frames
