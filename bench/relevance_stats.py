"""Issue #17's table recomputed on the real Clotho development captions: ListNet target mass, entropy and largest
other-clip probability per global batch size, with the paper's Sentence-BERT model (all-mpnet-base-v2).

    python bench/relevance_stats.py [--sbert DIR] [--work DIR] [--clips 2048] [--seed 0]

What is measured is the command itself on shards built by the shard job: the real captions CSV goes through
`shards/build.py --dataset clotho` (which embeds every caption with the model) and `python -m relret relevance-stats`
reads the shards. The job needs audio, so each clip gets a stand-in WAV of 0.1 s of silence under its real file name
(the statistics use the captions only). Embedding the 19,195 captions with mpnet takes a few minutes on a CPU; with
`--work DIR` the shards are kept there and a rerun reuses them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ROOT.parent / "shared" / "data" / "clotho" / "clotho_captions_development.csv"
MODEL = "all-mpnet-base-v2"
STAND_IN_S = 0.1
# Issue #17: global batch -> (own-clip mass, entropy in nats, largest other-clip probability).
EXPECTED = {32: (0.995, 0.02, 0.004), 256: (0.968, 0.15, 0.015), 1024: (0.905, 0.49, 0.027), 2048: (0.848, 0.81, 0.034)}
MASS_TOLERANCE = 0.02
ENTROPY_RELATIVE_TOLERANCE = 0.10


def resolve_model(sbert: str | None) -> str:
    """The model directory: --sbert, else `relret.sbert.resolve_sbert(MODEL)` (installed by `relret sbert install`)."""
    if sbert:
        if not Path(sbert).is_dir():
            raise SystemExit(f"--sbert {sbert} is not a directory holding a sentence-transformers model")
        return sbert
    try:
        from relret.sbert import resolve_sbert
    except ImportError:
        raise SystemExit(f"this relret has no relret.sbert.resolve_sbert: pass --sbert DIR (a local {MODEL})") from None
    try:
        return str(resolve_sbert(MODEL))
    except ValueError as exc:  # not installed: the message says how
        raise SystemExit(str(exc)) from None


def write_stand_in_audio(captions_csv: Path, audio_dir: Path) -> int:
    """A 0.1 s silent WAV under each clip's real file name; returns the number of clips."""
    import soundfile as sf

    audio_dir.mkdir(parents=True, exist_ok=True)
    silence = np.zeros(int(STAND_IN_S * 32_000), dtype=np.float32)
    with captions_csv.open(encoding="utf-8", newline="") as fh:
        names = [row["file_name"] for row in csv.DictReader(fh)]
    for name in names:
        path = audio_dir / name
        if not path.exists():
            sf.write(path, silence, 32_000, subtype="PCM_16")
    return len(names)


def build_shards(captions_csv: Path, audio_dir: Path, out: Path, model_dir: str, num_cpus: int) -> Path:
    """The shard job on a private local Ray; returns the shard directory (resumes a finished or partial build)."""
    cmd = [
        sys.executable,
        str(ROOT / "shards" / "build.py"),
        "--dataset",
        "clotho",
        "--captions",
        str(captions_csv),
        "--audio-dir",
        str(audio_dir),
        "--out",
        str(out),
        "--sbert",
        model_dir,
        "--sbert-device",
        "cpu",
        "--samples-per-shard",
        "500",
        "--num-cpus",
        str(num_cpus),
        "--no-progress-bar",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "clotho" / "development"


def compare(rows: list[dict]) -> list[str]:
    """Lines comparing each measured row to issue #17's, with pass/fail on mass (abs) and entropy (relative)."""
    lines = [
        "| global batch | mass (issue) | entropy (issue) | max other (issue) | within 0.02 mass / 10% entropy |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        b = r["global_batch_size"]
        if b not in EXPECTED:
            continue
        mass, entropy, other = EXPECTED[b]
        ok = abs(r["own_mass"] - mass) <= MASS_TOLERANCE and (
            abs(r["entropy_nats"] - entropy) <= ENTROPY_RELATIVE_TOLERANCE * entropy
        )
        lines.append(
            f"| {b} | {r['own_mass']:.3f} ({mass}) | {r['entropy_nats']:.3f} ({entropy}) "
            f"| {r['max_other']:.3f} ({other}) | {'yes' if ok else 'NO'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=Path, default=CAPTIONS, help="Clotho development captions CSV")
    parser.add_argument("--sbert", default=None, help=f"local {MODEL} directory (default: relret.sbert.resolve_sbert)")
    parser.add_argument("--work", type=Path, default=None, help="keep audio stand-ins and shards here (reruns reuse)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, EXPECTED)))
    parser.add_argument("--clips", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=0, help="CPUs of the shard job's Ray (0: all)")
    args = parser.parse_args()
    from relret.target_stats import main as relevance_stats

    model_dir = resolve_model(args.sbert)
    with tempfile.TemporaryDirectory(prefix="relevance_stats_") as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        n_clips = write_stand_in_audio(args.captions, work / "audio")
        t_audio = time.perf_counter() - t0
        shard_dir = build_shards(
            args.captions, work / "audio", work / "shards", model_dir, args.num_cpus or os.cpu_count()
        )
        t_shards = time.perf_counter() - t0 - t_audio
        out_json = work / "relevance_stats.json"
        argv = ["--shards", str(shard_dir), "--batch-sizes", args.batch_sizes]
        argv += ["--clips", str(args.clips), "--seed", str(args.seed), "--json", str(out_json)]
        print(f"\n$ python -m relret relevance-stats {' '.join(argv)}")
        t1 = time.perf_counter()
        rc = relevance_stats(argv)
        t_stats = time.perf_counter() - t1
        if rc != 0:
            raise SystemExit(rc)
        result = json.loads(out_json.read_text())
    print()
    print("\n".join(compare(result["rows"])))
    print(
        f"\n{n_clips} clips: stand-in audio {t_audio:.1f} s, shard job (embedding {MODEL}) {t_shards:.1f} s, "
        f"relevance-stats {t_stats:.1f} s, total {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
