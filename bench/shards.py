"""Throughput and driver memory of the shard job (`shards/build.py` on a private local Ray).

    .venv/bin/python bench/shards.py                      # both workloads, 1000 clips each; memory for 1k and 10k
    .venv/bin/python bench/shards.py --clips 300 --workloads clotho --memory-clips 1000

Throughput: the Ray job against a plain single-process loop doing the same work on the same synthetic corpus
(`shards.synth`): the same audio function (`shards.job.encode_clips`: decode, mono, 32 kHz, crop to 30 s, FLAC), the
same Sentence-BERT embedding in batches of the same size, the same shard writer. Both run as fresh processes timed
end to end (imports, model load and, for Ray, starting Ray included), alternately, `--rounds` times each; medians are
reported, with the CPU seconds each used (summed over its process tree, sampled from /proc), which other jobs on the
machine disturb much less than wall time. The loop's torch uses its default threads (all cores) for the embeddings.
The "bound" line is the most any parallel version of the loop could gain: the loop's wall time against its CPU time
divided by the CPUs (its work spread perfectly, with no start-up, transfer or scheduling cost added). The line after
it does the same for the Ray job's own CPU time: the most the job could gain with the CPU it uses, were no CPU ever
idle; the rest of the gap is idle CPU (start-up, the tail, stopping Ray).

Workloads (both synthetic scenes from `shards.synth`):
- clotho: 15-30 s, 44.1 kHz 16-bit WAV, five captions per clip (Clotho's shape);
- wavcaps: 20-40 s (cropped to 30 s), 32 kHz 16-bit FLAC, one caption per clip (WavCaps' shape; its ~400k clips are
  most of the sharding work).

Memory: the driver's peak RSS (ru_maxrss of the build.py process; the Ray processes are separate) for corpora of
`--memory-clips` clips of 1-2 s (the driver never holds audio, so clip length does not matter to it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
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

WORKLOADS = {
    # name: (dataset, min_s, max_s, sample rate, format, captions per clip)
    "clotho": ("clotho", 15.0, 30.0, 44_100, "wav", 5),
    "wavcaps": ("folder", 20.0, 40.0, 32_000, "flac", 1),
}


def plain_loop(dataset: str, captions: str, audio_dir: str, out: str, samples_per_shard: int, report: str) -> None:
    """The job's work in one process, one chunk of 32 clips after the other."""
    t_start = time.perf_counter()
    import numpy as np

    from relret import storage
    from relret.sbert import embed_captions, load_sbert
    from relret.shard_format import shard_name
    from shards.job import encode_clips, order_clips
    from shards.readers import read_catalog
    from shards.writer import ShardWriter

    clips = order_clips(read_catalog(dataset, captions).clips, 0)
    model = load_sbert(device="cpu")
    writer = ShardWriter(storage.join(out, dataset, "loop"))
    index = count = 0
    timeline = []
    for start in range(0, len(clips), 32):
        part = clips[start : start + 32]
        statuses, encoded = encode_clips(part, audio_dir, dataset, "loop", 30.0)
        sbert = embed_captions(model, [c for clip in part for c in clip.captions]).astype(np.float16)
        offsets = np.cumsum([0] + [len(clip.captions) for clip in part]).tolist()
        for j, reason in enumerate(statuses):
            if reason is not None:
                continue
            if count == 0:
                writer.begin(shard_name(dataset, "loop", index))
            writer.add(encoded, sbert, [(j, offsets[j], offsets[j + 1])])
            count += 1
            if count == samples_per_shard:
                writer.finish(count, {"fingerprint": "", "index": index, "start": 0, "end": 0, "skipped": []})
                index, count = index + 1, 0
        timeline.append((time.perf_counter() - t_start, start + len(part)))
    if count:
        writer.finish(count, {"fingerprint": "", "index": index, "start": 0, "end": 0, "skipped": []})
    Path(report).write_text(json.dumps({"timeline": timeline}))


def steady_rate(timeline: list, clips: int) -> float:
    """Clips/s between 25% and 75% of the clips (start-up and the last stragglers left out)."""
    import numpy as np

    t, n = np.array(timeline, dtype=float).T
    t25, t75 = np.interp([0.25 * clips, 0.75 * clips], n, t)
    return 0.5 * clips / (t75 - t25)


def _tree_cpu_s(root: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of `root` and its descendants, by PID, from /proc."""
    info: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            info[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {}, [root]
    while frontier:
        tree.update({p: info[p][1] for p in frontier if p in info})
        frontier = [p for p, (parent, _) in info.items() if parent in frontier and p not in tree]
    return tree


def _run(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of the command's whole process tree (sampled every 0.2 s until it exits)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        cpu.update(_tree_cpu_s(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{proc.stderr.read()[-3000:]}")
    return wall, sum(cpu.values())


def _corpus(root: Path, workload: str, clips: int, min_s: float | None = None, max_s: float | None = None):
    """(dataset, captions file, audio dir) of a synthetic corpus of the workload's shape, written once."""
    from shards.synth import write_corpus

    dataset, lo, hi, rate, fmt, n_captions = WORKLOADS[workload]
    lo, hi = min_s or lo, max_s or hi
    root = root / f"{workload}-{clips}-{lo:g}-{hi:g}"
    clotho_csv = root / "clotho_captions_development.csv"
    if not clotho_csv.exists():
        write_corpus(root, clips=clips, seed=0, min_s=lo, max_s=hi, sample_rate_hz=rate, audio_format=fmt)
    if dataset == "clotho":
        return dataset, clotho_csv, root / "development"
    folder_csv = root / "captions.csv"  # a user's folder of clips with one caption each
    with clotho_csv.open(encoding="utf-8", newline="") as fh, folder_csv.open("w", encoding="utf-8", newline="") as out:
        rows = list(csv.reader(fh))[1:]
        csv.writer(out).writerows([["file_name", "caption"]] + [[r[0], *r[1 : 1 + n_captions]] for r in rows])
    return dataset, folder_csv, root / "development"


def _build_argv(corpus, out: Path, samples_per_shard: int, report: Path, extra: list[str]) -> list[str]:
    dataset, captions, audio = corpus
    return [
        sys.executable, str(REPO / "shards/build.py"), "--dataset", dataset, "--captions", str(captions),
        "--audio-dir", str(audio), "--out", str(out), "--samples-per-shard", str(samples_per_shard),
        "--no-progress-bar", "--report", str(report), *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=1000, help="clips per throughput corpus")
    p.add_argument("--workloads", default="clotho,wavcaps", help=f"comma-separated, from {', '.join(WORKLOADS)}")
    p.add_argument("--rounds", type=int, default=2, help="runs of each contender (alternating); medians reported")
    p.add_argument("--memory-clips", default="1000,10000", help="comma-separated corpus sizes for the memory runs")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--workdir", default=None, help="keep corpora here (default: a temporary directory)")
    p.add_argument("--job-args", default="", help="extra build.py flags for the Ray job, e.g. '--sbert-actors 1'")
    p.add_argument("--loop", nargs=6, metavar=("DATASET", "CAPTIONS", "AUDIO", "OUT", "N", "REPORT"),
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args(argv)
    if args.loop:  # the plain loop's own process
        dataset, captions, audio, out, n, report = args.loop
        plain_loop(dataset, captions, audio, out, int(n), report)
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="relret-bench-"))
    extra = args.job_args.split()
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    for workload in [w for w in args.workloads.split(",") if w]:
        corpus = _corpus(work, workload, args.clips)
        runs: dict[str, list[tuple[float, float, float]]] = {"loop": [], "ray": []}
        for r in range(args.rounds):
            out = work / f"out-{workload}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            loop_argv = [sys.executable, __file__, "--loop", corpus[0], str(corpus[1]), str(corpus[2])]
            wall, cpu = _run([*loop_argv, str(out / "loop"), str(args.samples_per_shard), str(out / "l.json")])
            runs["loop"].append(
                (wall, cpu, steady_rate(json.loads((out / "l.json").read_text())["timeline"], args.clips))
            )
            wall, cpu = _run(_build_argv(corpus, out / "ray", args.samples_per_shard, out / "r.json", extra))
            runs["ray"].append(
                (wall, cpu, steady_rate(json.loads((out / "r.json").read_text())["timeline"], args.clips))
            )
            print(
                f"  {workload} round {r + 1}: loop {runs['loop'][-1][0]:.1f} s ({runs['loop'][-1][1]:.0f} CPU s), "
                f"Ray {runs['ray'][-1][0]:.1f} s ({runs['ray'][-1][1]:.0f} CPU s), load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in runs.items()}
        print(f"{workload}: {args.clips} clips (median of {args.rounds})        end to end    steady (25-75%)    CPU")
        for name, key in (("plain single-process loop", "loop"), ("Ray job", "ray")):
            wall, cpu, steady = med[key]
            print(
                f"  {name:26s} {args.clips / wall:7.1f} clips/s {steady:9.1f} clips/s {cpu / args.clips * 1e3:7.1f} ms/clip"
            )
        print(
            f"  {'speed-up':26s} {med['loop'][0] / med['ray'][0]:7.2f}x       {med['ray'][2] / med['loop'][2]:9.2f}x",
            flush=True,
        )
        cpus = os.cpu_count() or 1
        print(
            f"  bound: the loop's own CPU work spread perfectly over {cpus} CPUs, nothing added: "
            f"{med['loop'][0] / (med['loop'][1] / cpus):.2f}x end to end; the Ray job used "
            f"{med['ray'][1] - med['loop'][1]:+.1f} CPU s more than the loop",
            flush=True,
        )
        floor = med["ray"][1] / cpus
        print(
            f"  the Ray job's own CPU spread perfectly over {cpus} CPUs: {floor:.1f} s, so at most "
            f"{med['loop'][0] / floor:.2f}x with its CPU cost; it took {med['ray'][0]:.1f} s, "
            f"{med['ray'][0] - floor:.1f} s more (CPUs idle at start-up, in the tail and while Ray stops)",
            flush=True,
        )
    for n in [int(x) for x in args.memory_clips.split(",") if x]:
        corpus = _corpus(work, "clotho", n, 1.0, 2.0)
        report = work / f"mem-{n}.json"
        shutil.rmtree(work / f"mem-{n}", ignore_errors=True)
        wall, _ = _run(_build_argv(corpus, work / f"mem-{n}", args.samples_per_shard, report, extra))
        rss = json.loads(report.read_text())["driver_peak_rss_mb"]
        print(f"driver peak memory, {n:6d} clips: {rss:6.0f} MB  ({n / wall:.1f} clips/s, {wall:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
