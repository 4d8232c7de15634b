"""Tiny shard directories for tests, written with the real shard format (until `shards/` writes real ones).

Clips are synthetic sounds of a few classes (tones of different pitch, noise bursts, clicks) with captions that
name the class in several wordings; each caption's Sentence-BERT vector is a class direction plus a little noise
(random unit vectors: the values only need the structure "captions of one class are similar").
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from relret import shard_format

TAR_HEADERS = {"user": "relret", "group": "relret", "mtime": 0}
"""The tar headers shards/writer.py writes (an integer mtime: no pax header before each member); spelled out rather
than imported because this file also runs as a script, where `shards` would name this file."""

SR = shard_format.SAMPLE_RATE_HZ

CLASSES = {
    "beep": ["a high beep repeats", "a short high pitched beep", "beeping at a high pitch", "an alarm beeps"],
    "hum": ["a low hum drones on", "a deep humming sound", "low frequency hum of a machine", "something hums"],
    "noise": ["white noise hisses", "a steady hiss of noise", "static noise fills the room", "hissing static"],
    "clicks": ["rapid clicking sounds", "a clock ticks quickly", "clicks repeat steadily", "tick tick tick"],
}


def synth_audio(kind: str, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(duration_s * SR)) / SR
    if kind == "beep":
        x = np.sin(2 * np.pi * rng.uniform(2500, 3500) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    elif kind == "hum":
        x = np.sin(2 * np.pi * rng.uniform(60, 120) * t) + 0.5 * np.sin(2 * np.pi * 240 * t)
    elif kind == "noise":
        x = rng.standard_normal(len(t))
    else:
        x = np.zeros(len(t))
        x[:: int(SR / rng.uniform(8, 12))] = 1.0
    x = x + 0.01 * rng.standard_normal(len(t))
    return (0.5 * x / max(np.abs(x).max(), 1e-6)).astype(np.float32)


def class_vectors(dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for kind in CLASSES:
        v = rng.standard_normal(dim)
        out[kind] = v / np.linalg.norm(v)
    return out


@dataclasses.dataclass
class ClipSpec:
    kind: str
    duration_s: float
    n_captions: int


def write_shard_dir(
    out: Path,
    dataset: str = "synth",
    split: str = "train",
    n_clips: int = 32,
    per_shard: int = 4,
    sbert_dim: int = 384,
    durations_s: tuple[float, ...] = (1.0, 2.5, 4.0),
    max_captions: int = 4,
    seed: int = 0,
) -> list[dict]:
    """Write `n_clips` clips into shards of `per_shard` samples plus manifest.json; returns each clip's record
    (key, clip_id, kind, captions, duration) in writing order."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vectors = class_vectors(sbert_dim)
    kinds = list(CLASSES)
    records, shards = [], []
    for start in range(0, n_clips, per_shard):
        index = start // per_shard
        name = shard_format.shard_name(dataset, split, index)
        buf = io.BytesIO()
        with wds.TarWriter(buf, **TAR_HEADERS) as sink:
            for i in range(start, min(start + per_shard, n_clips)):
                kind = kinds[i % len(kinds)]
                duration = float(durations_s[i % len(durations_s)])
                n_cap = 1 + i % max_captions
                # the take number makes every caption unique: tied scores would make metrics depend on item order
                captions = [f"{CLASSES[kind][(i + j) % len(CLASSES[kind])]} take {i}" for j in range(n_cap)]
                noise = 0.3 / np.sqrt(sbert_dim)  # captions of one class: cosine about 0.9
                sbert = np.stack([vectors[kind] + noise * rng.standard_normal(sbert_dim) for _ in captions])
                sbert /= np.linalg.norm(sbert, axis=1, keepdims=True)
                source = f"{kind}_{i:05d}.wav"
                meta = shard_format.SampleMeta(
                    captions=captions,
                    clip_id=shard_format.stable_clip_id(dataset, source),
                    dataset=dataset,
                    split=split,
                    source_file=source,
                    duration_s=duration,
                )
                flac = shard_format.encode_flac(synth_audio(kind, duration, rng))
                sink.write(shard_format.encode_sample(meta, flac, sbert))
                records.append(
                    {
                        "key": shard_format.sample_key(dataset, meta.clip_id),
                        "clip_id": meta.clip_id,
                        "kind": kind,
                        "captions": captions,
                        "duration_s": duration,
                        "shard": name,
                    }
                )
        data = buf.getvalue()
        (out / name).write_bytes(data)
        count = min(start + per_shard, n_clips) - start
        shards.append(shard_format.ShardInfo(name, count, len(data), hashlib.sha256(data).hexdigest()))
    manifest = shard_format.Manifest(
        dataset=dataset,
        split=split,
        sbert_model="synthetic-class-vectors",
        sbert_dim=sbert_dim,
        shards=shards,
        skipped=[],
        config={"writer": "tests/kit/shards.py"},
    )
    (out / shard_format.MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return records


def read_shard_with_tarfile(path: Path) -> dict[str, shard_format.Sample]:
    """The samples of one shard by key, in member order, read with tarfile (not the training reader): the independent
    reference the tests compare the reader and the evaluation against."""
    members: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return {k: shard_format.decode_sample(v) for k, v in members.items()}


def read_samples_with_tarfile(shard_dir: Path) -> list[shard_format.Sample]:
    """Every sample of a shard directory, in shard and member order (`read_shard_with_tarfile` per shard)."""
    return [s for shard in sorted(Path(shard_dir).glob("*.tar")) for s in read_shard_with_tarfile(shard).values()]


def truncate_shard(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut a shard file to part of its length (a damaged upload or a full disk)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def main(argv: list[str] | None = None) -> None:
    """`python tests/kit/shards.py ROOT`: a synthetic corpus at ROOT/synth/{train,val} for configs/tiny_cpu.yaml."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("root", type=Path)
    p.add_argument("--train-clips", type=int, default=256)
    p.add_argument("--val-clips", type=int, default=48)
    p.add_argument("--per-shard", type=int, default=16)
    args = p.parse_args(argv)
    durations = (1.5, 3.0, 5.0, 8.0)
    write_shard_dir(
        args.root / "synth" / "train", n_clips=args.train_clips, per_shard=args.per_shard, durations_s=durations, seed=1
    )
    write_shard_dir(
        args.root / "synth" / "val",
        split="val",
        n_clips=args.val_clips,
        per_shard=args.per_shard,
        durations_s=durations,
        seed=2,
    )
    print(f"wrote {args.train_clips} training and {args.val_clips} validation clips under {args.root / 'synth'}")


if __name__ == "__main__":
    main()
