"""Audio as relret reads it: any file libsndfile reads -> mono float32 at 32 kHz, cropped.

The one reader of audio files: the shard job (before 16-bit FLAC encoding), `RetrievalModel.encode_audio_files`
and `relret index --audio-dir` all use `load_clip`.

soundfile decodes, channels are averaged, soxr resamples (its default high quality), and the clip is cropped to
`max_duration_s` from its start. Only the part of the file that survives the crop (plus a short margin for the
resampling filter) is decoded, so a 2-hour recording costs what 30 s cost, and the cropped output equals the first
samples of the full resampled file. A missing, unreadable, truncated or empty file raises `BadAudio` with the reason;
the shard job skips that clip and lists the reason in the manifest; the retrieval commands report it.

Output length: round(frames_in * 32000 / sample_rate_in) samples (soxr's rule), at most
floor(max_duration_s * 32000).
"""

from __future__ import annotations

import io
import math
import os
import re

import numpy as np

from relret import storage
from relret.shard_format import SAMPLE_RATE_HZ

# Input samples decoded beyond the crop point, so the resampler sees the signal its filter reaches past the last
# output sample (soxr's high-quality filter spans far fewer than this at any rate we meet).
_CROP_MARGIN_S = 0.05
# libsndfile notes a WAV/AIFF whose data chunk is shorter than its header says as "data : 529200 (should be 264578)".
_SHORT_CHUNK = re.compile(r"^(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class BadAudio(ValueError):
    """An audio file that cannot be used; the message is the reason recorded in the manifest."""


def max_samples(max_duration_s: float, sample_rate_hz: int = SAMPLE_RATE_HZ) -> int:
    return int(math.floor(max_duration_s * sample_rate_hz + 1e-9))


def load_clip(url: str, max_duration_s: float | None, sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """The clip at `url` (local path or s3://) as float32 mono [T] at `sample_rate_hz`, T <= max_samples(...);
    `max_duration_s` None: the whole file."""
    import soundfile as sf
    import soxr

    source = _open_source(url)
    try:
        with sf.SoundFile(source) as f:
            short = [m for m in _SHORT_CHUNK.finditer(f.extra_info) if int(m.group(3)) < int(m.group(2))]
            if short:
                m = short[0]
                raise BadAudio(f"audio file is truncated ({m.group(1)} chunk has {m.group(3)} of {m.group(2)} bytes)")
            rate_in, frames = f.samplerate, f.frames
            wanted = frames
            if max_duration_s is not None:
                wanted = min(frames, math.ceil((max_duration_s + _CROP_MARGIN_S) * rate_in))
            audio = f.read(wanted, dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise BadAudio(f"audio file unreadable ({_libsndfile_reason(exc)})") from None
    if len(audio) < wanted:
        raise BadAudio(f"audio file is truncated (decoded {len(audio)} of {wanted} frames)")
    if len(audio) == 0:
        raise BadAudio("audio file holds no samples")
    mono = audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
    if not np.all(np.isfinite(mono)):
        raise BadAudio("audio holds NaN or infinite samples")
    out_len = round(frames * sample_rate_hz / rate_in)
    if max_duration_s is not None:
        out_len = min(out_len, max_samples(max_duration_s, sample_rate_hz))
    if out_len == 0:
        raise BadAudio(f"audio is too short ({frames} frames at {rate_in} Hz)")
    if rate_in != sample_rate_hz:
        mono = soxr.resample(mono, rate_in, sample_rate_hz)
    return np.ascontiguousarray(mono[:out_len], dtype=np.float32)


def _open_source(url: str) -> str | io.BytesIO:
    """A local path as is (libsndfile reads only what it needs); an S3 object downloaded into memory."""
    if not storage.is_s3(url):
        if not os.path.isfile(url):
            raise BadAudio("audio file not found")
        if os.path.getsize(url) == 0:
            raise BadAudio("audio file is empty (0 bytes)")
        return url
    from botocore.exceptions import ClientError

    try:
        data = storage.read_bytes(url)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise BadAudio("audio file not found") from None
        raise
    if not data:
        raise BadAudio("audio file is empty (0 bytes)")
    return io.BytesIO(data)


def _libsndfile_reason(exc: Exception) -> str:
    text = str(exc)
    # "Error opening <BytesIO>: Format not recognised." -> "Format not recognised."
    return text.split(": ", 1)[1] if text.startswith("Error opening") and ": " in text else text
