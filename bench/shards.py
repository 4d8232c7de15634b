"""Throughput and driver memory of the shard job (`shards/build.py` on a private local Ray).

    .venv/bin/python bench/shards.py                       # throughput (600 Clotho-like clips) + memory (1k, 10k)
    .venv/bin/python bench/shards.py --clips 300 --memory-clips 1000

Throughput: the Ray job against a plain single-process loop doing the same work on the same synthetic corpus
(`shards.synth`): the same audio function (`shards.job.encode_clips`: decode, mono, 32 kHz, crop, FLAC), the same
Sentence-BERT embedding in batches of the same size, the same shard writer. Both run as fresh processes and are timed
end to end (imports, model load and, for Ray, starting Ray included), alternately, `--rounds` times each; medians are
reported. The loop uses torch's default threads (all cores) for the embeddings.

Memory: the driver's peak RSS (ru_maxrss of the build.py process; the Ray processes are separate) for corpora of
`--memory-clips` clips (1-2 s each, to keep the run short; the driver never holds audio, so clip length does not
matter to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This file is named like the `shards` package; as a script its folder comes first on sys.path and would shadow it.
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    del sys.path[0]


def plain_loop(captions: str, audio_dir: str, out: str, samples_per_shard: int, clips_per_task: int) -> dict:
    """The job's work in one process, one chunk after the other."""
    t0 = time.perf_counter()
    import numpy as np

    from relret import storage
    from relret.sbert import embed_captions, load_sbert
    from relret.shard_format import shard_name
    from shards.job import encode_clips, order_clips
    from shards.readers import read_clotho
    from shards.writer import ShardWriter

    clips = order_clips(read_clotho(captions).clips, 0)
    model = load_sbert(device="cpu")
    out_dir = storage.join(out, "clotho", "loop")
    writer = ShardWriter(out_dir)
    index = count = 0
    for start in range(0, len(clips), clips_per_task):
        part = clips[start : start + clips_per_task]
        statuses, encoded = encode_clips(part, audio_dir, "clotho", "loop", 30.0)
        sbert = embed_captions(model, [c for clip in part for c in clip.captions]).astype(np.float16)
        offsets = np.cumsum([0] + [len(clip.captions) for clip in part]).tolist()
        for j, reason in enumerate(statuses):
            if reason is not None:
                continue
            if count == 0:
                writer.begin(shard_name("clotho", "loop", index))
            writer.add(encoded, sbert, [(j, offsets[j], offsets[j + 1])])
            count += 1
            if count == samples_per_shard:
                writer.finish(count, {"fingerprint": "", "index": index, "start": 0, "end": 0, "skipped": []})
                index, count = index + 1, 0
    if count:
        writer.finish(count, {"fingerprint": "", "index": index, "start": 0, "end": 0, "skipped": []})
    return {"clips": len(clips), "wall_s": time.perf_counter() - t0}


def _run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _corpus(root: Path, clips: int, min_s: float, max_s: float) -> Path:
    from shards.synth import write_corpus

    if not (root / "clotho_captions_development.csv").exists():
        write_corpus(root, clips=clips, seed=0, min_s=min_s, max_s=max_s)
    return root


def _build_argv(corpus: Path, out: Path, samples_per_shard: int, report: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, str(REPO / "shards/build.py"), "--dataset", "clotho",
        "--captions", str(corpus / "clotho_captions_development.csv"), "--audio-dir", str(corpus / "development"),
        "--out", str(out), "--samples-per-shard", str(samples_per_shard), "--no-progress-bar", "--report", str(report),
        *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=600, help="clips in the throughput corpus")
    p.add_argument("--min-s", type=float, default=15.0, help="shortest clip of the throughput corpus (Clotho: 15)")
    p.add_argument("--max-s", type=float, default=30.0, help="longest clip of the throughput corpus (Clotho: 30)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each contender (alternating); medians reported")
    p.add_argument("--memory-clips", default="1000,10000", help="comma-separated corpus sizes for the memory runs")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--workdir", default=None, help="keep corpora here (default: a temporary directory)")
    p.add_argument("--job-args", default="", help="extra build.py flags for the Ray job, e.g. '--sbert-actors 2'")
    p.add_argument("--loop", nargs=4, metavar=("CAPTIONS", "AUDIO", "OUT", "SAMPLES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loop:  # the child process of the plain loop
        print(json.dumps(plain_loop(*args.loop[:3], int(args.loop[3]), 32)))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="relret-bench-"))
    corpus = _corpus(work / f"corpus-{args.clips}-{args.min_s:g}-{args.max_s:g}", args.clips, args.min_s, args.max_s)
    extra = args.job_args.split()
    ray_s, loop_s = [], []
    for r in range(args.rounds):
        loop_s.append(
            _run([sys.executable, __file__, "--loop", str(corpus / "clotho_captions_development.csv"),
                  str(corpus / "development"), str(work / f"loop-{r}"), str(args.samples_per_shard)])
        )  # fmt: skip
        ray_s.append(_run(_build_argv(corpus, work / f"ray-{r}", args.samples_per_shard, work / "r.json", extra)))
        print(f"round {r + 1}: plain loop {loop_s[-1]:.1f} s, Ray job {ray_s[-1]:.1f} s", flush=True)
    loop_rate, ray_rate = args.clips / statistics.median(loop_s), args.clips / statistics.median(ray_s)
    print(
        f"throughput, {args.clips} clips of {args.min_s:g}-{args.max_s:g} s (44.1 kHz WAV, 5 captions each), end to "
        f"end:\n  plain single-process loop  {loop_rate:6.1f} clips/s\n  Ray job                    {ray_rate:6.1f} "
        f"clips/s\n  speed-up                   {ray_rate / loop_rate:6.2f}x",
        flush=True,
    )
    for n in [int(x) for x in args.memory_clips.split(",") if x]:
        corpus = _corpus(work / f"corpus-{n}-1-2", n, 1.0, 2.0)
        report = work / f"mem-{n}.json"
        wall = _run(_build_argv(corpus, work / f"mem-{n}", args.samples_per_shard, report, extra))
        rss = json.loads(report.read_text())["driver_peak_rss_mb"]
        print(f"driver peak memory, {n:6d} clips: {rss:6.0f} MB  ({n / wall:.1f} clips/s, {wall:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
