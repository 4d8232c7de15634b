"""Decoding a training crop from FLAC bytes: the whole clip then a slice, against the window only (relret.flac_crop).

    .venv/bin/python bench/flac_decode.py
    .venv/bin/python bench/flac_decode.py --rounds 5 --clips 16 --synthetic

Both ways draw the crop with `crop_window` and decode in this one process from FLAC bytes held in memory (what a
DataLoader worker holds after reading a tar member), so the timing is the decoder's alone:
- full: `shard_format.decode_flac(data)` then `audio[start : start + length]` (relret.data today);
- window: `flac_frames(data)` (header), then `decode_flac_window(data, start, length)`.

Workloads:
- clotho-10s / clotho-30s: clips of 15-30 s cropped to 10 s or 30 s (the paper crops Clotho to 30 s, which keeps
  every clip whole: there the two ways decode the same samples and the ratio shows only the overhead);
- wavcaps-30s: clips of 60-120 s stored and cropped to 30 s (only if shards keep long clips: the shard job's default
  `--max-duration-s 30` stores at most 30 s, and then WavCaps looks like clotho-30s).

The audio is real where ../shared/data/audio/clotho_evaluation holds the Clotho clips (resampled to 32 kHz, cut or
joined to each length from random offsets); otherwise, or with --synthetic, tones over noise. The two ways alternate
(order swapped every round) over the same clips with the same crops; each round's clips/s is the clips over the
time of one pass; medians of the rounds are reported, and each ratio is the median of the per-round ratios. Decoding
is single-threaded, so clips per CPU second of this process (`cpu`) is the steadier figure when other jobs share the
machine; `wall` is what a worker sees.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from relret import shard_format
from relret.flac_crop import crop_window, decode_flac_window, flac_frames

SR = shard_format.SAMPLE_RATE_HZ
REPO = Path(__file__).resolve().parents[1]
DEFAULT_AUDIO = REPO.parent / "shared" / "data" / "audio" / "clotho_evaluation"

WORKLOADS = {
    # name: (shortest clip s, longest clip s, crop s)
    "clotho-10s": (15.0, 30.0, 10.0),
    "clotho-30s": (15.0, 30.0, 30.0),
    "wavcaps-30s": (60.0, 120.0, 30.0),
}


def source_audio(audio_dir: Path, synthetic: bool) -> tuple[np.ndarray, str]:
    """One long float32 mono signal at 32 kHz to cut clips from, and what it is."""
    files = sorted(audio_dir.glob("*.wav")) if audio_dir.is_dir() and not synthetic else []
    if files:
        from relret.audio import load_clip

        return np.concatenate([load_clip(str(f), None) for f in files]), f"{len(files)} real clips from {audio_dir}"
    rng = np.random.default_rng(0)
    t = np.arange(200 * SR) / SR
    tones = sum(0.1 * np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * t / p) > 0) for f, p in [(220, 7), (1370, 3)])
    return (tones + 0.05 * rng.standard_normal(len(t))).astype(np.float32), "synthetic tones over noise"


def make_clips(source: np.ndarray, n_clips: int, min_s: float, max_s: float, rng: np.random.Generator) -> list[bytes]:
    """FLAC bytes of `n_clips` clips of uniform random length, each cut from `source` (wrapped around) at a random
    offset."""
    out = []
    for _ in range(n_clips):
        n = int(rng.uniform(min_s, max_s) * SR)
        offset = int(rng.integers(len(source)))
        out.append(shard_format.encode_flac(np.take(source, np.arange(offset, offset + n), mode="wrap")))
    return out


def full_then_slice(data: bytes, start: int, length: int) -> np.ndarray:
    return shard_format.decode_flac(data)[0][start : start + length]


def window_only(data: bytes, start: int, length: int) -> np.ndarray:
    return decode_flac_window(data, start, length)


def one_pass(
    clips: list[bytes], crop_frames: int, seed: int, decode: Callable[[bytes, int, int], np.ndarray]
) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second of this process) for decoding one crop of every clip, the crop
    drawn as training draws it (header read included)."""
    rng = np.random.default_rng(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for data in clips:
        start, length = crop_window(flac_frames(data), crop_frames, rng)
        decode(data, start, length)
    return len(clips) / (time.perf_counter() - wall), len(clips) / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds per workload (medians reported)")
    parser.add_argument("--clips", type=int, default=24, help="clips per workload")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--audio-dir", type=Path, default=DEFAULT_AUDIO, help="WAV files to cut clips from")
    parser.add_argument("--synthetic", action="store_true", help="tones over noise instead of real audio")
    args = parser.parse_args()

    t_start = time.perf_counter()
    source, what = source_audio(args.audio_dir, args.synthetic)
    print(f"audio: {what}; {args.clips} clips per workload, {args.rounds} rounds, one process", flush=True)
    header = (
        f"{'workload':<12} {'clip s':>9} {'MB/clip':>7} | {'clips/s wall: full':>18} {'window':>7} {'ratio':>6} | "
        f"{'clips/CPU-s: full':>17} {'window':>7} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for name in args.workloads:
        min_s, max_s, crop_s = WORKLOADS[name]
        clips = make_clips(source, args.clips, min_s, max_s, rng)
        crop_frames = round(crop_s * SR)
        check = np.random.default_rng(1), np.random.default_rng(1)
        for data in clips:  # the two ways must give the same samples before their speed means anything
            a = full_then_slice(data, *crop_window(flac_frames(data), crop_frames, check[0]))
            b = window_only(data, *crop_window(flac_frames(data), crop_frames, check[1]))
            assert np.array_equal(a, b), name
        full, window = [], []
        for r in range(args.rounds):
            ways = [(full, full_then_slice), (window, window_only)]
            for rates, decode in ways if r % 2 == 0 else ways[::-1]:
                rates.append(one_pass(clips, crop_frames, seed=r, decode=decode))
        mb = statistics.mean(len(c) for c in clips) / 1e6
        cols = []
        for i in (0, 1):  # wall, CPU
            f, w = [x[i] for x in full], [x[i] for x in window]
            ratio = statistics.median(b / a for a, b in zip(f, w))
            cols.append(f"{statistics.median(f):>{18 - i}.1f} {statistics.median(w):>7.1f} {ratio:>5.2f}x")
        print(f"{name:<12} {min_s:>4.0f}-{max_s:<4.0f} {mb:>7.2f} | {cols[0]} | {cols[1]}", flush=True)
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
