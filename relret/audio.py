"""Reading audio files as the model expects them: mono float32 at 32 kHz (soundfile decodes, soxr resamples)."""

from __future__ import annotations

import os

import numpy as np

from relret.shard_format import SAMPLE_RATE_HZ


def to_model_rate(audio: np.ndarray, sample_rate: int, max_duration_s: float | None = None) -> np.ndarray:
    """[T] or [T, channels] audio at `sample_rate` -> mono float32 [T'] at 32 kHz, cut to `max_duration_s`.

    Channels are averaged. The cut happens before resampling (on the source samples), so long files are cheap.
    """
    import soxr

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise ValueError(f"audio must be [T] or [T, channels], got shape {audio.shape}")
    if max_duration_s is not None:
        audio = audio[: int(round(max_duration_s * sample_rate))]
    if sample_rate != SAMPLE_RATE_HZ and len(audio):
        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE_HZ, quality="HQ").astype(np.float32)
    return audio


def load_audio(path: str | os.PathLike, max_duration_s: float | None = None) -> np.ndarray:
    """Any file libsndfile reads -> mono float32 [T] at 32 kHz, at most `max_duration_s` long.

    Raises ValueError naming the file when it cannot be decoded or holds no samples.
    """
    import soundfile as sf

    try:
        info = sf.info(str(path))
        frames = -1 if max_duration_s is None else int(round(max_duration_s * info.samplerate))
        audio, sr = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise ValueError(f"cannot decode audio file {path}: {exc}") from exc
    if audio.shape[0] == 0:
        raise ValueError(f"audio file {path} holds no samples")
    return to_model_rate(audio, int(sr), max_duration_s)
