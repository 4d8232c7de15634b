"""Training-stream throughput per CPU core against the ceiling of decoding the same crops alone, side by side.

    .venv/bin/python bench/loader.py                          # ~1.5 min on 2 cores: both shapes, 1 and 2 workers
    .venv/bin/python bench/loader.py --batches 24 --clotho-clips 96 --wavcaps-clips 64 --workers 1 2 4

For each corpus shape (synthetic shards written with tests/kit/shards.py into a temporary directory):
- clotho: clips of 15-30 s with 1-5 captions (the shard kit cycles the count; Clotho has 5);
- wavcaps: clips of 60-120 s with one caption (shards that keep long clips, so that each epoch crops afresh);
- audiocaps: clips of 10 s with one caption (AudioCaps' training split: a 10 s crop decodes the whole clip, no seek),
four things are timed, all cropping to --crop-s (30 s: data.crop_s's default):
- stream: relret.data.TrainStream through make_loader with 1, 2, ... DataLoader workers, as training runs it (tar
  headers and the small members, json, the part of the clip's FLAC member its crop needs read from the shard and
  decoded into int16, Sentence-BERT vectors, collate into a reused shared-memory slot, the hand-over to this
  process); clips/s over the batches after each worker's first (the workers' start and the shuffle buffer's fill are
  left out), that rate per worker, and clips per second of the workers' own CPU time
  over the same batches (read in each worker as it yields a batch);
- the decode alone, from the same clips' FLAC bytes already in RAM, in this process: `flac_frames` + `crop_window` +
  `read_flac_window` into one reused int16 buffer, the stream's decode (the ceiling: what a core could do if reading,
  parsing, collating and handing over cost nothing; measured before and after every stream run, median of the
  passes); the same decode reading the clip from its shard on demand (`relret.tar_member.TarMember`, as the stream
  does: "crop from the shard"); `decode_flac_window` to float32 (the decode before int16 batches); the whole clip to
  float32 then a slice (`shard_format.decode_flac`: before crop decoding).
- the stream paired with its ceiling (unless --no-paired): the same stream run again, each worker decoding every
  batch's crops a second time, alone, from the clips' FLAC bytes in RAM (the ones the decodes above read, shared with
  the forked workers), before it yields the batch (that CPU left out of the stream's); the stream and its ceiling are
  then timed in the same process, batch after batch, under the same load, where the ceiling above is timed apart from
  the stream, in another process, and its passes swing by up to a third on these machines.
Printed ratios: stream per worker / ceiling (wall: what a worker delivers, sharing the cores with the other workers
and this process), per worker CPU second / ceiling (what the rest of the stream costs besides the decode; the
issue's target is 0.85), the same paired in the worker (the steady form of that ratio; also its range over single
batches), and int16 crop / whole. Clips/s counts training samples: with data.epoch_unit caption (the
paper's setting, the default here) a clip is decoded once per caption, each with a crop of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from relret import shard_format  # noqa: E402
from relret.config import DataConfig, ShardSource  # noqa: E402
from relret.flac_crop import crop_window, decode_flac_window, flac_frames, read_flac_window  # noqa: E402
from relret.tar_member import ShardFile, TarMember  # noqa: E402

SR = shard_format.SAMPLE_RATE_HZ

SHAPES = {
    # name: (clip durations in seconds, cycled over the clips; most captions per clip)
    "clotho": ((15.0, 18.0, 21.0, 24.0, 27.0, 30.0), 5),
    "wavcaps": ((60.0, 75.0, 90.0, 105.0, 120.0), 1),
    "audiocaps": ((10.0,), 1),
}


def write_corpus(root: Path, shape: str, n_clips: int, per_shard: int, seed: int = 0) -> Path:
    """A shard directory of `n_clips` synthetic clips of the given shape (tests/kit/shards.py's writer)."""
    from kit.shards import write_shard_dir

    durations_s, max_captions = SHAPES[shape]
    out = root / shape
    write_shard_dir(
        out,
        dataset=shape,
        n_clips=n_clips,
        per_shard=per_shard,
        durations_s=durations_s,
        max_captions=max_captions,
        seed=seed,
    )
    return out


def flac_in_memory(shard_dir: Path) -> list[tuple[bytes, int, TarMember]]:
    """(FLAC bytes, captions, the clip as a TarMember of its shard) of every clip of a shard directory, the bytes read
    into RAM with tarfile."""
    out = []
    for shard in sorted(shard_dir.glob("*.tar")):
        shard_file = ShardFile(str(shard))
        with tarfile.open(shard) as tar:
            infos = {m.name: m for m in tar.getmembers() if m.isfile()}
            members = {name: tar.extractfile(m).read() for name, m in infos.items()}
        for name, data in members.items():
            if name.endswith(".flac"):
                meta = members[name[: -len("flac")] + shard_format.META_EXT]
                member = TarMember(shard_file, infos[name].offset_data, infos[name].size)
                out.append((data, len(json.loads(meta)["captions"]), member))
    if not out:
        raise RuntimeError(f"no .flac member in the shards of {shard_dir}")
    return out


DECODES = ("pcm", "member", "float", "whole")
"""pcm: the window as int16 into one reused buffer (`read_flac_window`) from the bytes in memory (the ceiling);
member: the same, read from the shard on demand (`TarMember`, what the stream does); float: the window to a
new float32 array (`decode_flac_window`, the stream's decode before int16 batches); whole: the whole clip to float32,
then a slice (`shard_format.decode_flac`, before crop decoding)."""


def decode_rates(
    clips: list[tuple[bytes, int, TarMember]], crop_s: float, how: str, per_caption: bool, rounds: int
) -> list[float]:
    """Training samples per CPU second of this process decoding one crop per sample, the `DECODES` way `how`: one
    rate per pass over the clips."""
    crop_frames = round(crop_s * SR)
    buffer = np.empty(crop_frames, dtype=np.int16)
    rates = []
    for r in range(rounds):
        rng = np.random.default_rng(r)
        n = 0
        cpu = time.process_time()
        for data, captions, member in clips:
            for _ in range(captions if per_caption else 1):
                start, length = crop_window(flac_frames(data), crop_frames, rng)
                if how == "pcm":
                    read_flac_window(data, start, buffer[:length])
                elif how == "member":
                    read_flac_window(member, start, buffer[:length])
                elif how == "float":
                    decode_flac_window(data, start, length)
                else:
                    shard_format.decode_flac(data)[0][start : start + length]
                n += 1
        rates.append(n / max(time.process_time() - cpu, 1e-9))
    return rates


def data_config(shard_dir: Path, crop_s: float, workers: int, args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        train=[ShardSource(path=str(shard_dir))],
        sbert_dim=384,
        crop_s=crop_s,
        num_workers=workers,
        prefetch_factor=args.prefetch_factor,
        epoch_unit=args.epoch_unit,
        # small, so that the timed batches come after the buffer's fill (it holds no clip bytes: see buffer_bytes)
        shuffle_buffer=args.shuffle_buffer,
        shuffle_initial=min(args.shuffle_buffer, 16),
    )


_DECODE_CPU_S = [0.0]
"""CPU seconds this process's thread spent in relret.data's read_flac_window (each DataLoader worker its own copy)."""
_DECODES_MADE: list[tuple] = []
"""(FLAC data, start, frames) of every crop relret.data's read_flac_window decoded since the list was last emptied."""


@contextlib.contextmanager
def _timed_decodes():
    """While open, every crop decode of the training stream in this process (relret.data.read_flac_window) is timed
    (`_DECODE_CPU_S`) and recorded (`_DECODES_MADE`); on leaving, the decoder is put back and the record emptied, so
    that no TarMember (and its open shard) is kept after the stream."""
    import relret.data

    decode = relret.data.read_flac_window

    def timed(data, start, out):
        t = time.thread_time()
        try:
            return decode(data, start, out)
        finally:
            _DECODE_CPU_S[0] += time.thread_time() - t
            _DECODES_MADE.append((data, start, len(out)))

    relret.data.read_flac_window = timed
    try:
        yield
    finally:
        relret.data.read_flac_window = decode
        _DECODES_MADE.clear()


def _paired_ceiling(made: list[tuple], in_ram: dict[tuple[str, int], bytes], buffer: np.ndarray) -> tuple[float, int]:
    """The ceiling for crops the stream has just decoded, in the same worker: `flac_frames` + `read_flac_window` of
    the same windows from the clips' FLAC bytes held in RAM (`in_ram`: by shard path and offset, see `by_place`), as
    `decode_rates` times its "pcm" pass. Returns the CPU seconds of this thread and the windows decoded."""
    t, decoded = time.thread_time(), 0
    for data, start, n in made:
        if isinstance(data, TarMember):
            data = in_ram[(data.shard.path, data.offset)]
        flac_frames(data)
        read_flac_window(data, start, buffer[:n])
        decoded += 1
    return time.thread_time() - t, decoded


def by_place(clips: list[tuple[bytes, int, TarMember]]) -> dict[tuple[str, int], bytes]:
    """`flac_in_memory`'s FLAC bytes by where the stream's TarMembers say the clips lie: (shard path, offset)."""
    return {(member.shard.path, member.offset): data for data, _, member in clips}


def timed_stream(*args, in_ram: dict[tuple[str, int], bytes] | None = None, **kwargs):
    """relret.data.TrainStream whose batches carry the CPU seconds their worker process had used when it yielded
    them (`worker_cpu_s`: every thread of the worker, so sending the previous batch is included) and the part of them
    spent decoding crops (`worker_decode_s`). Given `in_ram` (`by_place`; a forked worker shares it), the worker also
    decodes each batch's crops again, alone, from those bytes, before yielding the batch (`_paired_ceiling`):
    `worker_ceiling_s` and `worker_ceiling_clips` are that ceiling's CPU seconds and crops so far, and its CPU is
    left out of `worker_cpu_s`."""
    from relret.data import TrainStream

    class TimedStream(TrainStream):
        def __iter__(self):
            buffer = np.empty(self.crop_samples, dtype=np.int16)
            ceiling_s, ceiling_clips = 0.0, 0
            with _timed_decodes():  # in the process that iterates: the DataLoader worker
                for batch in super().__iter__():
                    if in_ram is not None:
                        spent, decoded = _paired_ceiling(_DECODES_MADE, in_ram, buffer)
                        ceiling_s, ceiling_clips = ceiling_s + spent, ceiling_clips + decoded
                    _DECODES_MADE.clear()
                    batch.worker_cpu_s = time.process_time() - ceiling_s
                    batch.worker_decode_s = _DECODE_CPU_S[0]
                    batch.worker_ceiling_s, batch.worker_ceiling_clips = ceiling_s, ceiling_clips
                    yield batch

    return TimedStream(*args, **kwargs)


def stream_rate(
    shard_dir: Path,
    crop_s: float,
    workers: int,
    batch: int,
    batches: int,
    args,
    in_ram: dict[tuple[str, int], bytes] | None = None,
) -> dict:
    """Clips/s of the real training stream with `workers` DataLoader workers, over the batches after each worker's
    first (the workers' start and the shuffle buffer's fill are left out), and clips per worker CPU second over the
    same batches: the CPU each worker used between yielding its first and its last batch, for the batches in
    between. Given the clips' bytes `in_ram` (a paired run, see `timed_stream`), also the ceiling measured in the
    workers batch by batch over the same batches: `paired_ratio` (clips per worker CPU second / the ceiling's clips per CPU second) and the range of
    that ratio over single batches; the wall-clock figures of such a run include the ceiling's work."""
    from relret.data import make_loader, open_shard_dir

    cfg = data_config(shard_dir, crop_s, workers, args)
    sets = [open_shard_dir(str(shard_dir), cfg.sbert_dim)]
    if len(sets[0].urls) < max(workers, 1):
        raise ValueError(f"{len(sets[0].urls)} shard(s) in {shard_dir} for {workers} workers: write smaller shards")
    n_workers = max(workers, 1)
    stream = timed_stream(
        sets,
        cfg,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        batch_size=batch,
        batches=batches + n_workers,
        start=None,
        in_ram=in_ram,
    )
    seen: dict[int, list] = {}
    t_first = None
    with make_loader(stream, cfg) as loader:
        for i, b in enumerate(loader):
            if i == n_workers - 1:
                t_first = time.perf_counter()
            seen.setdefault(b.info.worker, []).append(
                (len(b), b.worker_cpu_s, b.worker_decode_s, b.worker_ceiling_s, b.worker_ceiling_clips)
            )
        t_end = time.perf_counter()
    clips = sum(n for s in seen.values() for n, *_ in s[1:])
    rate = clips / (t_end - t_first)

    def spent(column: int) -> float:  # over the batches after each worker's first
        return sum(s[-1][column] - s[0][column] for s in seen.values())

    worker_cpu_s, decode_s, ceiling_s, ceiling_clips = spent(1), spent(2), spent(3), spent(4)
    paired = in_ram is not None
    out = {
        "workers": workers,
        "paired": paired,
        "clips_per_s": rate,
        "per_worker": rate / n_workers,
        "per_worker_cpu_s": clips / worker_cpu_s if workers and worker_cpu_s > 0 else None,
        "decode_share": decode_s / worker_cpu_s if workers and worker_cpu_s > 0 else None,
    }
    if paired and workers and worker_cpu_s > 0 and ceiling_s > 0:
        out["ceiling"] = ceiling_clips / ceiling_s
        out["clips"], out["ceiling_clips"] = clips, ceiling_clips
        out["paired_ratio"] = out["per_worker_cpu_s"] / out["ceiling"]
        per_batch = [
            (n / (cpu - prev[1])) / ((cc - prev[4]) / (cs - prev[3]))
            for s in seen.values()
            for prev, (n, cpu, _, cs, cc) in zip(s, s[1:])
            if cpu > prev[1] and cs > prev[3]
        ]
        out["batch_ratios"] = (min(per_batch), statistics.median(per_batch), max(per_batch))
    return out


def buffer_bytes(shard_dir: Path) -> float:
    """Mean bytes a raw sample of the local shards holds in the shuffle buffer: its members read into memory (json,
    Sentence-BERT vectors); the clip stays in the shard (`relret.tar_member.TarMember`)."""
    from relret.data import DamageCounter, _shard_samples

    sizes = [
        sum(len(v) for k, v in raw.items() if isinstance(v, bytes) and not k.startswith("__"))
        for shard in sorted(shard_dir.glob("*.tar"))
        for raw in _shard_samples(str(shard), DamageCounter("bench"))
    ]
    return statistics.mean(sizes)


def bench_shape(root: Path, shape: str, n_clips: int, args: argparse.Namespace) -> dict:
    per_shard = max(1, n_clips // max(max(args.workers), 1) // 2)
    shard_dir = write_corpus(root, shape, n_clips, per_shard)
    clips = flac_in_memory(shard_dir)
    per_caption = args.epoch_unit == "caption"
    rates = {how: decode_rates(clips, args.crop_s, how, per_caption, args.rounds) for how in DECODES}
    streams = []
    for w in args.workers:  # the ceiling is measured again after each stream run: the machine's load drifts
        streams.append(stream_rate(shard_dir, args.crop_s, w, args.batch, args.batches, args))
        rates["pcm"] += decode_rates(clips, args.crop_s, "pcm", per_caption, 1)
    for w in args.workers if args.paired else ():
        if w:
            streams.append(stream_rate(shard_dir, args.crop_s, w, args.batch, args.batches, args, by_place(clips)))
    return {
        "shape": shape,
        "clip_s": statistics.mean(flac_frames(d) for d, _, _ in clips) / SR,
        "mb_per_clip": statistics.mean(len(d) for d, _, _ in clips) / 1e6,
        "buffer_kb_per_sample": buffer_bytes(shard_dir) / 1e3,
        **{how: statistics.median(r) for how, r in rates.items()},
        "ceiling_range": (min(rates["pcm"]), max(rates["pcm"])),
        "streams": streams,
    }


def print_shape(r: dict, crop_s: float) -> None:
    print(
        f"{r['shape']}: clips of {r['clip_s']:.0f} s on average ({r['mb_per_clip']:.2f} MB FLAC), crop {crop_s:g} s; "
        f"clips/s are training samples per second; a sample holds {r['buffer_kb_per_sample']:.1f} kB in the shuffle "
        "buffer (the clip stays in the shard)"
    )
    print(
        f"  decode from RAM, one core:  crop to int16 {r['pcm']:7.1f} clips/CPU-s (the ceiling; passes "
        f"{r['ceiling_range'][0]:.1f}-{r['ceiling_range'][1]:.1f})   crop from the shard {r['member']:7.1f} "
        f"({r['member'] / r['pcm']:.2f}x)   crop to float32 "
        f"{r['float']:7.1f}   whole clip then slice {r['whole']:7.1f}   int16 crop / whole = "
        f"{r['pcm'] / r['whole']:.2f}x"
    )
    for s in r["streams"]:
        if s["paired"]:
            if "paired_ratio" in s:
                lo, mid, hi = s["batch_ratios"]
                print(
                    f"  stream, {s['workers']} worker(s), paired with the ceiling in the worker batch by batch: "
                    f"{s['per_worker_cpu_s']:6.1f} clips/worker-CPU-s against {s['ceiling']:6.1f}   "
                    f"per worker-CPU-s / ceiling = {s['paired_ratio']:.2f} (single batches {lo:.2f}-{hi:.2f}, "
                    f"median {mid:.2f}), decoding's share of the worker's CPU = {s['decode_share']:.2f}"
                )
            continue
        cpu, cpu_ratio = "n/a", ""
        if s["per_worker_cpu_s"]:
            cpu = f"{s['per_worker_cpu_s']:6.1f} clips/worker-CPU-s"
            cpu_ratio = (
                f", per worker-CPU-s / ceiling = {s['per_worker_cpu_s'] / r['pcm']:.2f}, decoding's share of the "
                f"worker's CPU = {s['decode_share']:.2f}"
            )
        print(
            f"  stream, {s['workers']} worker(s):  {s['clips_per_s']:7.1f} clips/s  {s['per_worker']:7.1f} per worker "
            f"({cpu})   per worker / ceiling = {s['per_worker'] / r['pcm']:.2f}{cpu_ratio}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--clotho-clips", type=int, default=48)
    p.add_argument("--audiocaps-clips", type=int, default=48)
    p.add_argument("--wavcaps-clips", type=int, default=32)
    p.add_argument("--crop-s", type=float, default=DataConfig.crop_s, help="crop length (data.crop_s)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to run")
    p.add_argument("--batch", type=int, default=16, help="clips per batch")
    p.add_argument("--batches", type=int, default=16, help="timed batches per stream run (after one per worker)")
    p.add_argument("--rounds", type=int, default=3, help="passes of the in-memory decodes (median)")
    p.add_argument("--epoch-unit", choices=("clip", "caption"), default="caption")
    p.add_argument("--shuffle-buffer", type=int, default=64)
    p.add_argument("--prefetch-factor", type=int, default=2)
    p.add_argument(
        "--no-paired",
        dest="paired",
        action="store_false",
        help="skip the second stream run per worker count whose workers time the ceiling batch by batch",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    print(
        f"relret.data TrainStream via make_loader against decoding alone; epoch unit {args.epoch_unit}, batch "
        f"{args.batch}, {args.batches} timed batches per run",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="relret-bench-loader-") as tmp:
        for shape in args.shapes:
            n = {"clotho": args.clotho_clips, "wavcaps": args.wavcaps_clips, "audiocaps": args.audiocaps_clips}[shape]
            print_shape(bench_shape(Path(tmp), shape, n, args), args.crop_s)
            sys.stdout.flush()
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
