"""A synthetic audio-caption corpus in Clotho's layout, for the embedded demo and for tests.

    python -m shards.synth --out DIR --clips N --seed S [--split development] [--min-s 2 --max-s 5]

writes `DIR/clotho_captions_{split}.csv` (file_name, caption_1..caption_5), the clips as 16-bit WAV (or FLAC) files
in `DIR/{split}/`, and `DIR/scenes_{split}.json` (the events of every clip, the ground truth for checks).

Each clip is a sound scene of one to three events in sequence over a faint noise floor. Six event types (a steady
tone, a pitch sweep, noise bursts, rhythmic clicks, a low mains hum, a ringing bell) vary in pitch, direction, rate
and loudness. Each clip gets five captions paraphrased from shared phrase lists: clips with the same event types
share caption words ("beep", "clicking", "hum") and attribute words ("high", "fast", "faint"), the way real captions
of similar sounds overlap, so caption similarity says which clips sound alike, and a small audio encoder can learn
the sound/caption relation on a CPU. Clip i depends only on (seed, i): a larger N extends a smaller corpus.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EVENTS = ("tone", "sweep", "noise", "clicks", "hum", "bell")

# Noun phrases per event type and attribute value; {loud} is replaced by a loudness adjective (or nothing).
PHRASES: dict[str, dict[str, list[str]]] = {
    "tone": {
        "high": ["a {loud} high-pitched beep", "a {loud} shrill electronic tone", "a {loud} high beeping sound"],
        "low": ["a {loud} low beep", "a {loud} deep electronic tone", "a {loud} low-pitched beeping sound"],
    },
    "sweep": {
        "up": ["a {loud} rising whistle", "a {loud} chirp sweeping upward", "a {loud} tone gliding up in pitch"],
        "down": ["a {loud} falling whistle", "a {loud} chirp sweeping downward", "a {loud} tone gliding down in pitch"],
    },
    "noise": {
        "fast": ["{loud} rapid bursts of static", "{loud} quick hissing bursts", "{loud} fast crackles of noise"],
        "slow": ["{loud} slow bursts of static", "{loud} long hissing bursts", "{loud} occasional gusts of noise"],
    },
    "clicks": {
        "fast": ["{loud} fast rhythmic clicking", "{loud} rapid ticking", "{loud} quick steady clicks"],
        "slow": ["{loud} slow rhythmic clicking", "{loud} slow ticking like a clock", "{loud} clicks at a slow pace"],
    },
    "hum": {
        "low": ["a {loud} low electrical hum", "a {loud} droning buzz", "a {loud} mains hum"],
        "high": ["a {loud} buzzing hum", "a {loud} whining electrical drone", "a {loud} high humming buzz"],
    },
    "bell": {
        "high": ["a {loud} small bell ringing", "a {loud} high chime", "a {loud} tinkling bell"],
        "low": ["a {loud} large bell tolling", "a {loud} deep gong", "a {loud} low ringing chime"],
    },
}
LOUDNESS = {"loud": ["loud", "strong", "clear"], "quiet": ["faint", "soft", "quiet"]}
ATTRIBUTES = {"tone": ("high", "low"), "sweep": ("up", "down"), "noise": ("fast", "slow"), "clicks": ("fast", "slow"),
              "hum": ("low", "high"), "bell": ("high", "low")}  # fmt: skip
# Sentence frames (none needs verb agreement, since phrases are singular or plural).
FRAMES = {
    1: ["{0}.", "You can hear {0}.", "{0} can be heard.", "A recording of {0}.", "Someone recorded {0}."],
    2: ["{0}, then {1}.", "{0}, followed by {1}.", "First {0}, and then {1}.", "{0} and afterwards {1}.",
        "{0} before {1}."],
    3: ["{0}, then {1}, then {2}.", "{0}, followed by {1} and {2}.", "First {0}, next {1}, finally {2}.",
        "{0}, {1} and then {2}.", "{0}, later {1} and at the end {2}."],
}  # fmt: skip


def scene(rng: np.random.Generator) -> list[dict]:
    """One to three events: type, attribute, loudness (types may repeat, as in real recordings)."""
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    return [
        {
            "type": (kind := str(rng.choice(EVENTS))),
            "attribute": str(rng.choice(ATTRIBUTES[kind])),
            "loudness": str(rng.choice(["loud", "quiet"], p=[0.6, 0.4])),
        }
        for _ in range(n)
    ]


def captions_for(events: Sequence[dict], rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` distinct paraphrases of the scene (event order kept; loudness mentioned in some)."""
    out: list[str] = []
    frames = list(rng.permutation(FRAMES[len(events)]))
    for attempt in range(50):
        parts = []
        for e in events:
            phrase = str(rng.choice(PHRASES[e["type"]][e["attribute"]]))
            loud = str(rng.choice(LOUDNESS[e["loudness"]])) if rng.random() < 0.6 else ""
            parts.append(" ".join(phrase.replace("{loud}", loud).split()))
        text = str(frames[attempt % len(frames)]).format(*parts)
        text = text[0].upper() + text[1:]
        if text not in out:
            out.append(text)
        if len(out) == n:
            return out
    raise AssertionError("the phrase lists give fewer than five distinct captions")  # 5 frames x 3 phrases each


def render(events: Sequence[dict], duration_s: float, sample_rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """float32 mono [duration_s * sample_rate_hz]: the events one after another over a faint noise floor."""
    n = int(duration_s * sample_rate_hz)
    out = (10 ** (-50 / 20) * rng.standard_normal(n)).astype(np.float64)
    slot = n // len(events)
    for k, e in enumerate(events):
        length = int(slot * rng.uniform(0.6, 0.9))
        start = k * slot + int(rng.integers(0, slot - length + 1))
        sound = _event(e, length, sample_rate_hz, rng)
        gain = rng.uniform(0.4, 0.7) if e["loudness"] == "loud" else rng.uniform(0.05, 0.12)
        fade = np.minimum(1.0, np.minimum(np.arange(length), np.arange(length)[::-1]) / (0.005 * sample_rate_hz))
        out[start : start + length] += gain * sound / (np.abs(sound).max() + 1e-9) * fade
    return np.clip(out, -1, 1).astype(np.float32)


def _event(e: dict, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    kind, attr = e["type"], e["attribute"]
    if kind == "tone":
        f = rng.uniform(1500, 3000) if attr == "high" else rng.uniform(250, 500)
        return np.sin(2 * np.pi * f * t)
    if kind == "sweep":
        lo, hi = rng.uniform(300, 600), rng.uniform(2500, 4500)
        f0, f1 = (lo, hi) if attr == "up" else (hi, lo)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1] if n > 1 else 1))
        return np.sin(phase)
    if kind == "noise":
        period = rng.uniform(0.08, 0.15) if attr == "fast" else rng.uniform(0.35, 0.6)
        gate = (t % period) < period * 0.5
        return rng.standard_normal(n) * gate
    if kind == "clicks":
        period = rng.uniform(0.06, 0.1) if attr == "fast" else rng.uniform(0.25, 0.45)
        out = np.zeros(n)
        click = np.exp(-np.arange(int(0.004 * sr)) / (0.0008 * sr)) * rng.standard_normal(int(0.004 * sr))
        for start in range(0, n - len(click), max(1, int(period * sr))):
            out[start : start + len(click)] += click
        return out
    if kind == "hum":
        f = rng.uniform(50, 60) if attr == "low" else rng.uniform(110, 180)
        return sum(np.sin(2 * np.pi * f * h * t) / h for h in range(1, 8))
    if kind == "bell":
        f = rng.uniform(1200, 2200) if attr == "high" else rng.uniform(180, 350)
        env = np.exp(-t / rng.uniform(0.3, 0.8))
        return env * sum(a * np.sin(2 * np.pi * f * r * t) for r, a in ((1, 1.0), (2.76, 0.5), (5.4, 0.25)))
    raise ValueError(f"unknown event type {kind!r}")


def write_corpus(
    out: str | Path,
    clips: int,
    seed: int = 0,
    split: str = "development",
    min_s: float = 2.0,
    max_s: float = 5.0,
    sample_rate_hz: int = 44_100,
    audio_format: str = "wav",
) -> Path:
    """Write the corpus (16-bit `audio_format` files: wav or flac); returns the captions CSV path."""
    import soundfile as sf
    from tqdm import tqdm

    if clips < 1 or not 0 < min_s <= max_s:
        raise ValueError(f"need clips >= 1 and 0 < min_s <= max_s, got {clips}, {min_s}, {max_s}")
    if audio_format not in ("wav", "flac"):
        raise ValueError(f"audio format {audio_format!r}: choose wav or flac")
    out = Path(out)
    audio_dir = out / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows, scenes = [], {}
    for i in tqdm(range(clips), desc="synth", unit="clip", mininterval=1.0, disable=clips < 200):
        rng = np.random.default_rng([seed, i])
        events = scene(rng)
        name = f"scene_{i:06d}.{audio_format}"
        duration_s = float(rng.uniform(min_s, max_s))
        sf.write(audio_dir / name, render(events, duration_s, sample_rate_hz, rng), sample_rate_hz, subtype="PCM_16")
        rows.append([name, *captions_for(events, rng)])
        scenes[name] = events
    captions = out / f"clotho_captions_{split}.csv"
    with captions.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        writer.writerows(rows)
    (out / f"scenes_{split}.json").write_text(json.dumps(scenes, indent=1))
    return captions


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clips", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, default=0, help="clip i depends only on (seed, i)")
    p.add_argument("--split", default="development", help="split name in the file names")
    p.add_argument("--min-s", type=float, default=2.0, help="shortest clip, seconds")
    p.add_argument("--max-s", type=float, default=5.0, help="longest clip, seconds")
    p.add_argument("--sample-rate", type=int, default=44_100, help="sample rate, Hz (Clotho: 44100)")
    p.add_argument("--format", default="wav", choices=["wav", "flac"], help="audio file format (16-bit)")
    args = p.parse_args(argv)
    try:
        path = write_corpus(
            args.out, args.clips, args.seed, args.split, args.min_s, args.max_s, args.sample_rate, args.format
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.clips} clips: {path} and {Path(args.out) / args.split}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
