"""Streaming training and validation batches from WebDataset shards (local or s3://), see `relret.shard_format`.

Training (`TrainStream`): every epoch has its own shard sequence, drawn with replacement from all training sources
with a seed shared by every rank (`epoch_seed(seed, epoch)`); position i of that sequence goes to stream
i mod (ranks x workers), so ranks and DataLoader workers read disjoint shard draws and together read exactly the
sequence one process would read. What a training sample is depends on `data.epoch_unit`: a clip with one random
caption of its own ("clip"), or, with "caption", one caption of a clip: every clip read is repeated once per caption
before the shuffle buffer (the copies share its bytes), so an epoch holds every caption once in expectation, as the
authors' datasets of len(clips) x 5 items. Samples pass a shuffle buffer; each then gets its caption (with its
Sentence-BERT vector, plus all of the clip's vectors for the mean/max relevance variants) and a random crop, drawn
from a generator seeded by the sample's place in the epoch's sequence, so the choice does not depend on how the
sequence was split. Several sources mix with weights: a shard of source d is drawn with probability proportional
to w_d / N_d (N_d samples in d: clips, or captions with epoch_unit caption), which makes d's expected share of
training samples w_d / sum(w); without weights every sample is equally likely (the sources concatenated).

Each worker yields whole micro-batches, in the DataLoader's round-robin order (batch i of the epoch comes from
worker i mod n), and stops after its share of the epoch. A batch carries its worker's position (batches made, raw samples read); a checkpoint stores the positions
and a resumed run skips exactly that many raw samples per worker (reading but not decoding them), so it continues
with the batches an uninterrupted run would have produced (same world size and worker count required; otherwise
the epoch's remaining steps start a fresh stream and a warning says so).

Damaged data does not stop training: a shard that cannot be read to its end (truncated, corrupt) or holds fewer
samples than its manifest lists, and a sample that does not decode, are skipped with a warning and counted; the counts travel with the batches to the training loop.

Only the audio a batch uses is decoded: a training clip's random crop (drawn from the clip length in the FLAC header,
with the same random draw as a crop of the decoded clip) and a validation clip's first `val_crop_s` seconds
(`relret.flac_crop`), as the shards' 16-bit PCM: a batch carries int16 `pcm` (half the bytes of float32 from the
workers to the training process and to the GPU) and `Batch.audio` is the float signal, bit for bit what a float
decode gives. Local shards are read with random access, their clips' bytes only as far as a crop needs them and
never held in the shuffle buffer (`relret.tar_member`); S3 shards are streamed (`_shard_samples`); training workers
decode their crops straight into reused shared-memory blocks (`PcmSlots`, `_BlockRows`), which the loader copies
out of as it receives them.

A batch is a `Batch`; training batches carry `StreamInfo` (the worker's position and its damage counts).
Evaluation shards are opened with `open_eval_shards`, and `eval_data_config` gives the streaming settings to read
them with `ValStream`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from relret import shard_format, storage
from relret.config import ConfigError, DataConfig
from relret.flac_crop import PCM_FULL_SCALE, crop_window, read_flac_window
from relret.tar_member import ShardFile, TarMember

# ---------------------------------------------------------------------------------------------------------------------
# Shard directories


@dataclasses.dataclass
class ShardSet:
    """The shards of one source as its manifest describes them (urls in manifest order)."""

    path: str
    weight: float | None
    urls: list[str]
    samples: list[int]
    """Clips per shard (the manifest's counts)."""
    manifest: shard_format.Manifest
    epoch_samples: list[int] | None = None
    """Training samples per shard in one epoch when they are not its clips: its captions (data.epoch_unit caption,
    `count_captions`); None: its clips."""

    @property
    def total_samples(self) -> int:
        """Training samples of one epoch of this source: its clips, or its captions with data.epoch_unit caption."""
        return sum(self.samples if self.epoch_samples is None else self.epoch_samples)


def open_shard_dir(path: str, sbert_dim: int | None, weight: float | None = None, what: str = "data.train") -> ShardSet:
    """Read and check a shard directory: manifest present, shards present, embedding dimension as configured
    (`sbert_dim` None: whatever the manifest says, for readers that do not use the vectors)."""
    if storage.is_s3(path):
        storage.register_webdataset_s3()
    try:
        manifest = shard_format.read_manifest(path)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    present = {u.rsplit("/", 1)[-1] for u in storage.list_files(path, "*.tar")}
    if not present:
        raise ValueError(
            f"{what}: no shard matches {storage.join(path, '*.tar')}; write shards there first "
            "(`python shards/build.py`), or fix the path"
        )
    missing = [s.name for s in manifest.shards if s.name not in present]
    if missing:
        raise ValueError(
            f"{what}: {len(missing)} shard(s) listed in {storage.join(path, shard_format.MANIFEST_NAME)} are missing "
            f"(first: {missing[0]}); rewrite the shards or restore the files"
        )
    shards = [s for s in manifest.shards if s.samples > 0]
    if not shards:
        raise ValueError(f"{what}: the manifest in {path} lists no shard with samples")
    if sbert_dim is not None and manifest.sbert_dim != sbert_dim:
        raise ValueError(
            f"data.sbert_dim={sbert_dim} but the shards in {path} hold {manifest.sbert_dim}-dimensional Sentence-BERT "
            f"vectors ({manifest.sbert_model}); set data.sbert_dim={manifest.sbert_dim} or rebuild the shards"
        )
    return ShardSet(path, weight, [storage.join(path, s.name) for s in shards], [s.samples for s in shards], manifest)


def open_train_sources(cfg: DataConfig, world_size: int) -> list[ShardSet]:
    """All training sources, checked; there must be at least as many shards as ranks x workers. With
    data.epoch_unit caption, each shard's captions are counted (`count_captions`)."""
    if not cfg.train:
        raise ConfigError("data.train is empty: name at least one shard directory (data.train=[{path: DIR}])")
    sets = [open_shard_dir(s.path, cfg.sbert_dim, s.weight) for s in cfg.train]
    n_shards = sum(len(s.urls) for s in sets)
    streams = world_size * max(1, cfg.num_workers)
    if n_shards < streams:
        raise ValueError(
            f"{n_shards} training shard(s) for {world_size} rank(s) x {max(1, cfg.num_workers)} worker(s) = {streams} "
            "readers: every reader needs shards of its own. Write more, smaller shards, or lower data.num_workers"
        )
    if cfg.epoch_unit == "caption":
        for s in sets:
            t_start = time.perf_counter()
            s.epoch_samples = count_captions(s.urls)
            if not s.total_samples:
                raise ValueError(f"data.epoch_unit=caption: no caption could be counted in the shards of {s.path}")
            if _is_main():
                print(
                    f"relret.data: data.epoch_unit=caption: {s.total_samples} captions of {sum(s.samples)} clips in "
                    f"{s.path} (counted in {len(s.urls)} shard(s), {time.perf_counter() - t_start:.1f} s)",
                    flush=True,
                )
    return sets


def _is_main() -> bool:
    from relret.distributed import read_world  # before any process group: the environment says which rank this is

    return read_world().rank == 0


COUNT_THREADS = 16
"""Shards read at once when counting captions (the reads wait on the file system or S3, not on the CPU)."""


def count_captions(urls: Sequence[str]) -> list[int]:
    """The captions in each shard: the sum of its json members' caption counts. Only tar headers and json members are
    read: the audio and vector members are seeked over in a local file (streamed past on S3). A shard that cannot be
    read to its end counts the captions before the damage (training skips the rest of it too), with a warning."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(COUNT_THREADS, len(urls)))) as pool:
        return list(pool.map(_count_shard_captions, urls))


def _count_shard_captions(url: str) -> int:
    import tarfile

    suffix = "." + shard_format.META_EXT
    count = 0
    try:
        with storage.open_read(url) as fh:
            with tarfile.open(fileobj=fh, mode="r:" if fh.seekable() else "r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(suffix):
                        count += len(json.loads(tar.extractfile(member).read())["captions"])
    except (OSError, EOFError, tarfile.TarError, ValueError, KeyError, TypeError) as exc:
        print(
            f"relret.data: WARNING: counting captions in {url} stopped at {count}: {exc}", file=sys.stderr, flush=True
        )
    return count


def open_val_sources(cfg: DataConfig) -> list[ShardSet]:
    return [open_shard_dir(p, cfg.sbert_dim, what="data.val") for p in cfg.val]


# ---------------------------------------------------------------------------------------------------------------------
# The epoch's shard sequence


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every rank uses for epoch `epoch` (recorded in checkpoints)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint32)[0])


def shard_probabilities(sets: Sequence[ShardSet]) -> tuple[list[str], np.ndarray]:
    """All shard urls and their draw probabilities: proportional to w_d / N_d for a shard of source d (N_d its
    training samples, `ShardSet.total_samples`; w_d = N_d when the source has no weight)."""
    urls, probs = [], []
    for s in sets:
        weight = s.total_samples if s.weight is None else s.weight
        urls.extend(s.urls)
        probs.extend([weight / s.total_samples] * len(s.urls))
    p = np.asarray(probs, dtype=np.float64)
    return urls, p / p.sum()


def shard_sequence(urls: Sequence[str], probs: np.ndarray, seed: int) -> Iterator[tuple[int, str]]:
    """Endless (position, url) draws with replacement; the same seed gives the same sequence on every rank."""
    rng = np.random.default_rng(seed)
    position = 0
    while True:
        for index in rng.choice(len(urls), size=1024, p=probs):
            yield position, urls[index]
            position += 1


# ---------------------------------------------------------------------------------------------------------------------
# Damage accounting

MAX_EMPTY_SHARDS_IN_A_ROW = 64
MIN_READS_FOR_DAMAGE_LIMIT = 32
"""data.max_damaged_fraction is judged once an epoch has read at least this many shards (over all ranks): a few
damaged shards early in an epoch are not yet a fraction."""


class DamageCounter:
    """A webdataset handler: flags the error, warns once per url, and lets the stream go on. `count` is kept by the
    caller (one damaged shard can raise several errors)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.flagged = False
        self.url = "?"
        """The shard being read (set by the reader)."""
        self._warned: set[str] = set()

    def record(self, exn: BaseException) -> None:
        """Warn about and count one damaged item."""
        self(exn)
        self.count += 1

    def __call__(self, exn: BaseException) -> bool:
        self.flagged = True
        if self.url not in self._warned:
            self._warned.add(self.url)
            print(
                f"relret.data: WARNING: skipping {self.what} in {self.url}: {exn.args[0] if exn.args else exn!r}",
                file=sys.stderr,
                flush=True,
            )
        return True


class ShardTooShort(ValueError):
    """A shard ended cleanly but holds fewer samples than its manifest lists (cut at a tar block boundary)."""


class UnreadableShards(RuntimeError):
    """Shard after shard gave no sample: the data is unreadable, training cannot go on."""


_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")
"""Member names webdataset's tar reader leaves out (its `skip_meta`)."""


_warned_eager = [False]


def _local_tar_files(path: str, handler: DamageCounter) -> Iterator[dict]:
    """The regular files of a local tar shard, as webdataset's tar expander yields them (fname, data, __url__): the
    small members read whole, the audio (`.flac`) as a `TarMember` of the open shard that the crop decoder reads only
    in part (as bytes when this process already holds `tar_member.MAX_OPEN_SHARD_FILES` shards open). webdataset
    reads tars in stream mode, copying every byte of a member through 10 KiB chunks, and a shuffle buffer of FLAC
    bytes holds gigabytes per worker for minute-long clips; a local file needs neither. A shard that cannot be listed
    to its end (truncated or corrupt headers, a member whose data runs past the end of the file) goes to `handler`
    and ends there, as webdataset's reader does."""
    import os
    import tarfile

    audio_suffix = "." + shard_format.AUDIO_EXT
    try:
        shard = None if ShardFile.too_many_open() else ShardFile(path)
        if shard is None and not _warned_eager[0]:
            _warned_eager[0] = True
            print(
                f"relret.data: WARNING: {ShardFile.open_count} shard files open for the clips in the shuffle buffer "
                "(shards of few samples against data.shuffle_buffer); further clips are held as bytes",
                file=sys.stderr,
                flush=True,
            )
        # The listing reads through a duplicate of the shard's descriptor: the same file, whatever the path becomes.
        with os.fdopen(os.dup(shard.fd), "rb") if shard else open(path, "rb") as f:
            size = shard.stamp.size if shard else os.fstat(f.fileno()).st_size
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not member.isreg() or _WEBDATASET_META.match(member.name):
                        continue
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError(f"unexpected end of data: member {member.name} is cut")
                    if shard and member.name.endswith(audio_suffix):
                        data = TarMember(shard, member.offset_data, member.size)
                    else:
                        data = tar.extractfile(member).read()
                    yield {"fname": member.name, "data": data, "__url__": path}
    except Exception as exn:  # noqa: BLE001 (webdataset's contract: the handler decides)
        if not handler(exn):
            raise


def _shard_samples(url: str, handler: DamageCounter) -> Iterator[dict]:
    """The samples (member suffix -> bytes, with __key__ and __url__) of one shard: S3 shards streamed by
    webdataset, local ones read with random access (`_local_tar_files`); webdataset groups the members by key."""
    import webdataset as wds

    if storage.is_s3(url):
        return wds.tarfile_to_samples(handler=handler)([{"url": url}])
    return wds.tariterators.group_by_keys(_local_tar_files(url, handler), handler=handler)


def _raw_samples(
    positioned_urls: Iterator[tuple[int, str]], damage: DamageCounter, expected: dict[str, int], reads: list[int]
) -> Iterator[dict]:
    """Raw samples (member -> bytes) of each drawn shard, tagged with (position, index in shard). A shard that
    raises while being read, or holds fewer samples than `expected` (its manifest count), counts as damaged;
    `reads[0]` counts the shards read to their end."""
    empty_in_a_row = 0
    for position, url in positioned_urls:
        damage.flagged, damage.url = False, url
        index = -1
        for index, sample in enumerate(_shard_samples(url, damage)):
            sample["__pos__"] = (position, index)
            yield sample
        if not damage.flagged and index + 1 < expected.get(url, 0):
            damage(ShardTooShort(f"{index + 1} samples where the manifest lists {expected[url]}"))
        if damage.flagged:
            damage.count += 1
        reads[0] += 1
        empty_in_a_row = empty_in_a_row + 1 if index < 0 else 0
        if empty_in_a_row >= MAX_EMPTY_SHARDS_IN_A_ROW:
            raise UnreadableShards(
                f"{empty_in_a_row} shard reads in a row gave no sample (last: {url}); the shards are unreadable"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Samples and batches


@dataclasses.dataclass
class StreamInfo:
    """Where a training batch came from: its worker's position after it, and the damage seen since the last batch."""

    worker: int
    batches_done: int
    raw_pos: int
    damaged_shards: int
    """Shard reads of this worker found damaged since its previous batch."""
    bad_samples: int
    """Samples that did not decode since its previous batch."""
    shard_reads: int
    """Shards this worker read to their end since its previous batch."""


@dataclasses.dataclass
class Batch:
    """B clips with one caption each (training), or every clip of a validation batch with all its captions."""

    pcm: torch.Tensor
    """[B, T] int16 PCM samples at 32 kHz (the shards' 16-bit FLAC, decoded without conversion), zero-padded to the
    longest clip; `audio` is the float32 signal. Batches travel from the loader's workers, and to the GPU, at half
    the bytes of float32."""
    audio_len: torch.Tensor
    """[B] valid samples per row."""
    captions: list[str]
    """[B] the caption paired with each clip."""
    caption_sbert: torch.Tensor
    """[B, D] float32 Sentence-BERT vector of each paired caption."""
    clip_sbert: torch.Tensor
    """[B, C, D] float32 vectors of every caption of each clip (C = max_captions; padding under the mask)."""
    caption_mask: torch.Tensor
    """[B, C] bool, True for real captions."""
    clip_ids: torch.Tensor
    """[B] int64 stable clip ids."""
    keys: list[str]
    """[B] sample keys."""
    all_captions: list[list[str]] | None = None
    """Validation: every caption of each clip."""
    source_files: list[str] | None = None
    """Validation: each clip's source file name."""
    info: StreamInfo | None = None
    """Training: the stream's bookkeeping."""
    slot: tuple[int, int] | None = None
    """(DataLoader worker, slot) while `pcm` lies in a worker's reusable buffer (`PcmSlots`); the loader copies it
    out and clears this before handing the batch on."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def audio(self) -> torch.Tensor:
        """[B, T] float32 in [-1, 1), on the device of `pcm`: PCM / 32768, exactly what decoding the FLAC to float
        gives (`shard_format.decode_flac`). Computed on each access: move the batch first (`to`), then read it."""
        return self.pcm.float().mul_(1.0 / PCM_FULL_SCALE)

    def __getitem__(self, name: str) -> Any:
        """`batch["audio"]`, `batch["worker"]`: a field, or a field of its `info`, by name (read-only; the layout of
        batches before they were typed)."""
        if name in _BATCH_FIELDS or name == "audio":
            return getattr(self, name)
        if self.info is not None and name in _INFO_FIELDS:
            return getattr(self.info, name)
        names = ", ".join(sorted(_BATCH_FIELDS | _INFO_FIELDS | {"audio"}))
        raise KeyError(f"a Batch has no field {name!r}; it has {names}")

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (a DataLoader worker sending the batch): the small CPU tensors travel inline as numpy arrays and
        only `pcm` as a shared-memory tensor. torch would put each tensor into a shared-memory block of its own and
        pass the block's file descriptor over a socket: several of those per batch for a few kilobytes each."""
        state = dict(self.__dict__)
        for name, value in state.items():
            if torch.is_tensor(value) and name != "pcm" and value.device.type == "cpu":
                state[name] = value.numpy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()})

    def _map(self, fn) -> Batch:
        return dataclasses.replace(
            self,
            **{
                f.name: fn(getattr(self, f.name))
                for f in dataclasses.fields(self)
                if torch.is_tensor(getattr(self, f.name))
            },
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread."""
        return self._map(lambda t: t.pin_memory())


_BATCH_FIELDS = frozenset(f.name for f in dataclasses.fields(Batch))
_INFO_FIELDS = frozenset(f.name for f in dataclasses.fields(StreamInfo))


@dataclasses.dataclass
class _Clip:
    key: str
    clip_id: int
    pcm: np.ndarray
    """int16 PCM of the clip's window: a view of its row (`_RowBuffers`, `_BlockRows`), valid until the batch is
    collated."""
    caption: str
    caption_sbert: np.ndarray
    all_sbert: np.ndarray
    all_captions: list[str]
    source_file: str = ""


CAPTION_INDEX = "__caption__"
PARSED = "__parsed__"
"""A dict the per-caption copies of a raw sample share: `_decode` keeps the parsed sample (or its error) there."""


def _decode(raw: dict, sbert_dim: int) -> shard_format.EncodedSample:
    """The sample's members parsed and checked. The per-caption copies of a clip share one parse (`PARSED`): json,
    Sentence-BERT array and FLAC header are read once per clip, and a copy of a clip that does not parse raises the
    same error as the first."""
    parsed = raw.get(PARSED)
    if parsed is None:
        sample = shard_format.decode_sample_encoded(raw)
    else:
        if not parsed:
            try:
                parsed["sample"] = shard_format.decode_sample_encoded(raw)
            except Exception as exn:
                parsed["error"] = exn
        if "error" in parsed:
            raise parsed["error"]
        sample = parsed["sample"]
    if sample.meta.sample_rate != shard_format.SAMPLE_RATE_HZ:
        raise ValueError(f"sample {sample.key} is {sample.meta.sample_rate} Hz; the model reads 32 kHz shards")
    if sample.sbert.shape[1] != sbert_dim:
        raise ValueError(f"sample {sample.key}: Sentence-BERT dimension {sample.sbert.shape[1]}, config {sbert_dim}")
    return sample


class _RowBuffers:
    """One reusable int16 buffer per row of a batch, grown to the longest window it has held: clips are decoded
    into these, and only the collated batch is a new allocation (`_pcm_batch`), so a worker does not allocate and
    fault in fresh pages for every clip."""

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []

    def row(self, i: int, frames: int) -> np.ndarray:
        """Row i's buffer, at least `frames` long, as a view of exactly `frames`."""
        while len(self._rows) <= i:
            self._rows.append(np.empty(0, dtype=np.int16))
        if len(self._rows[i]) < frames:
            self._rows[i] = np.empty(frames, dtype=np.int16)
        return self._rows[i][:frames]


class _BlockRows:
    """The rows of one batch decoded straight into its PCM block: row i at offset i * stride of an int16
    [rows, stride] tensor (a worker's shared-memory slot), so that collating copies no PCM. `batch` then lays the
    rows out at the longest row's length, in place, and zero-pads the shorter ones."""

    def __init__(self, block: torch.Tensor) -> None:
        self.block = block
        self.stride = block.shape[1]
        self._flat = block.numpy().reshape(-1)

    def row(self, i: int, frames: int) -> np.ndarray:
        """Row i's place in the block, as a view of exactly `frames` (at most the stride)."""
        if frames > self.stride:
            raise ValueError(f"a window of {frames} frames does not fit a row of {self.stride}")
        return self._flat[i * self.stride : i * self.stride + frames]

    def batch(self, lengths: Sequence[int]) -> torch.Tensor:
        """The int16 [len(lengths), max(lengths)] view of the block holding rows 0.. with these lengths (what
        `collate` writes), after moving each row to its place at the longest row's stride. A row only moves
        towards the block's start, and rows move in order, so none is overwritten before it has moved; numpy
        copies a move whose source and destination overlap correctly."""
        width, flat, stride = max(lengths), self._flat, self.stride
        for i, n in enumerate(lengths):
            if width != stride and i:
                flat[i * width : i * width + n] = flat[i * stride : i * stride + n]
            flat[i * width + n : (i + 1) * width] = 0
        return self.block.view(-1)[: len(lengths) * width].view(len(lengths), width)


def _shared_int16(numel: int) -> torch.Tensor:
    """An uninitialised int16 vector in shared memory, allocated the way torch's default_collate allocates in
    DataLoader workers: sending it to the training process copies nothing (an ordinary tensor is first copied into a
    new shared-memory block)."""
    storage = torch.empty(0, dtype=torch.int16)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=torch.int16).new(storage)


def _pcm_batch(rows: int, length: int) -> torch.Tensor:
    """An uninitialised int16 [rows, length] tensor: in a DataLoader worker, in shared memory (`_shared_int16`)."""
    if get_worker_info() is None:
        return torch.empty((rows, length), dtype=torch.int16)
    return _shared_int16(rows * length).view(rows, length)


class PcmSlots:
    """Shared-memory PCM buffers that each DataLoader worker reuses, batch after batch, for one loader iteration.

    A new shared-memory block for every batch costs more than copying it: the kernel allocates and zeroes each of its
    pages on first touch (about 7,500 page faults for 16 clips of 30 s; on the 2-core machines of this project 25 ms
    per batch, a sixth of decoding its crops). So a worker writes batches into `per_worker` blocks of its own; the
    training process, as it receives a batch, copies the PCM out (or the DataLoader's pinning thread already did)
    and hands the block back through a queue (`release`). With prefetch_factor + 1 blocks a worker never waits: a
    worker has at most prefetch_factor batches outstanding, and the one just received is released right after the
    DataLoader asks the worker for the next. Should none come back within `WAIT_S` anyway, the worker uses a fresh
    block (`_pcm_batch`): never a wait for ever, and never a block written while the training process reads it."""

    WAIT_S = 0.5

    def __init__(self, num_workers: int, per_worker: int) -> None:
        import multiprocessing

        self.per_worker = per_worker
        self._returned = [multiprocessing.Queue() for _ in range(num_workers)]
        for q in self._returned:
            q.cancel_join_thread()  # never hold up the training process's exit for a slot number
        self._buffers: list[torch.Tensor | None] = []
        self._idle: list[int] = []
        """Worker side (each worker has its own copy of this object): blocks and the slots free to write."""

    def acquire(
        self, worker: int, rows: int, length: int, capacity: int
    ) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Worker side: an uninitialised int16 [rows, length] tensor in a free slot (blocks of at least `capacity`
        samples, grown when a batch needs more) and its (worker, slot); or a fresh block and None."""
        import queue

        if not self._buffers:
            self._buffers, self._idle = [None] * self.per_worker, list(range(self.per_worker))
        if not self._idle:
            try:
                self._idle.append(self._returned[worker].get(timeout=self.WAIT_S))
            except queue.Empty:
                return _pcm_batch(rows, length), None
        slot = self._idle.pop()
        block = self._buffers[slot]
        if block is None or block.numel() < rows * length:
            block = self._buffers[slot] = _shared_int16(max(rows * length, capacity))
        return block[: rows * length].view(rows, length), (worker, slot)

    def close(self) -> None:
        """Training process side, once the workers are gone: the queues' pipes and threads."""
        for q in self._returned:
            q.close()

    def release(self, batch: Batch) -> Batch:
        """Training process side: the batch with its PCM in memory of its own, its slot handed back."""
        if batch.slot is None:
            return batch
        pcm = batch.pcm if batch.pcm.is_pinned() else batch.pcm.clone()  # pinning copied it already
        worker, slot = batch.slot
        self._returned[worker].put(slot)
        batch.pcm, batch.slot = pcm, None
        return batch


def collate(
    clips: Sequence[_Clip], max_captions: int, pcm: torch.Tensor | None = None, pcm_written: bool = False
) -> Batch:
    """Stack clips into a batch (PCM zero-padded to the longest clip, caption vectors to `max_captions`); `pcm`: an
    int16 [len(clips), longest] tensor to write it into (default: a new one), or, with `pcm_written`, that already
    holds it (`_BlockRows.batch`: only the clips' lengths are read then)."""
    batch, dim = len(clips), clips[0].caption_sbert.shape[0]
    length = max(len(c.pcm) for c in clips)
    if pcm is None:
        pcm = _pcm_batch(batch, length)
    pcm_np = pcm.numpy()
    clip_sbert = np.zeros((batch, max_captions, dim), dtype=np.float32)
    caption_mask = np.zeros((batch, max_captions), dtype=bool)
    for i, c in enumerate(clips):
        n = len(c.pcm)
        if not pcm_written:
            pcm_np[i, :n] = c.pcm
            pcm_np[i, n:] = 0
        n = min(len(c.all_sbert), max_captions)
        clip_sbert[i, :n] = c.all_sbert[:n]
        caption_mask[i, :n] = True
    return Batch(
        pcm=pcm,
        audio_len=torch.tensor([len(c.pcm) for c in clips], dtype=torch.long),
        captions=[c.caption for c in clips],
        caption_sbert=torch.from_numpy(np.stack([c.caption_sbert for c in clips]).astype(np.float32)),
        clip_sbert=torch.from_numpy(clip_sbert),
        caption_mask=torch.from_numpy(caption_mask),
        clip_ids=torch.tensor([c.clip_id for c in clips], dtype=torch.long),
        keys=[c.key for c in clips],
    )


def _per_caption(raw_samples: Iterator[dict]) -> Iterator[dict]:
    """Each raw sample once per caption, tagged with the caption's index (`CAPTION_INDEX`); the copies share the
    sample's bytes and its parse (`PARSED`). A sample whose json does not read passes once, and its decoding counts it
    as bad."""
    for raw in raw_samples:
        try:
            n = len(json.loads(raw[shard_format.META_EXT])["captions"])
        except (KeyError, TypeError, ValueError):
            n = 1
        parsed: dict[str, Any] = {}
        for caption in range(max(n, 1)):
            yield {**raw, CAPTION_INDEX: caption, PARSED: parsed}


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def worker_quota(total_batches: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` makes when a DataLoader takes `total_batches` round-robin from `num_workers`."""
    return len(range(worker, total_batches, num_workers))


@dataclasses.dataclass
class StreamPosition:
    """How far one worker's stream got: batches it made and raw samples it read."""

    batches_done: int = 0
    raw_pos: int = 0


class StreamState:
    """The training stream's position per DataLoader worker, as a per-rank checkpoint part."""

    def __init__(self) -> None:
        self.positions: dict[int, StreamPosition] = {}

    def advance(self, info: StreamInfo) -> None:
        self.positions[info.worker] = StreamPosition(info.batches_done, info.raw_pos)

    def reset(self) -> None:
        self.positions = {}

    def state_dict(self) -> dict[str, Any]:
        return {"positions": {str(w): dataclasses.asdict(p) for w, p in self.positions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.positions = {int(w): StreamPosition(**p) for w, p in state.get("positions", {}).items()}


class TrainStream(IterableDataset):
    """One rank's training micro-batches for one epoch (see the module docstring)."""

    def __init__(
        self,
        sets: Sequence[ShardSet],
        cfg: DataConfig,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        batch_size: int,
        batches: int,
        start: dict[int, StreamPosition] | None = None,
    ) -> None:
        """`batches`: micro-batches this rank takes this epoch; `start`: positions per worker to resume from."""
        super().__init__()
        self.urls, self.probs = shard_probabilities(sets)
        self.expected = {u: n for s in sets for u, n in zip(s.urls, s.samples)}
        self.cfg = cfg
        self.epoch_seed = epoch_seed(seed, epoch)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.batches = batch_size, batches
        self.start = start or {}
        self.crop_samples = int(round(cfg.crop_s * shard_format.SAMPLE_RATE_HZ))
        self.per_caption = cfg.epoch_unit == "caption"
        self.pcm_slots: PcmSlots | None = None
        """Set by `BatchLoader` for an iteration with workers."""

    def _clip(self, raw: dict, rows: _RowBuffers | _BlockRows, row: int) -> _Clip:
        """The training sample of a raw sample: its caption and random crop, decoded into `rows.row(row, ...)`."""
        sample = _decode(raw, self.cfg.sbert_dim)
        position, index = raw["__pos__"]
        if self.per_caption:  # the caption is given; each caption of the clip gets a crop of its own
            pick = raw[CAPTION_INDEX]
            rng = np.random.default_rng([self.epoch_seed, position, index, pick])
        else:
            rng = np.random.default_rng([self.epoch_seed, position, index])
            pick = int(rng.integers(len(sample.meta.captions)))
        start, length = crop_window(sample.frames, self.crop_samples, rng)
        return _Clip(
            key=sample.key,
            clip_id=sample.meta.clip_id,
            pcm=read_flac_window(sample.flac, start, rows.row(row, length)),
            caption=sample.meta.captions[pick],
            caption_sbert=sample.sbert[pick].astype(np.float32),
            all_sbert=sample.sbert.astype(np.float32),
            all_captions=sample.meta.captions,
        )

    def __iter__(self) -> Iterator[Batch]:
        import webdataset as wds

        storage.register_webdataset_s3()
        worker_id, num_workers = _worker()
        # A DataLoader always starts its round-robin at worker 0; after a resume the next batch belongs to the
        # stream of worker k mod n (k batches consumed), so DataLoader worker i plays worker (i + k) mod n.
        consumed = sum(p.batches_done for p in self.start.values())
        worker = (worker_id + consumed) % num_workers
        stream = self.rank * num_workers + worker
        n_streams = self.world_size * num_workers
        quota = worker_quota(self.batches, worker, num_workers)
        pos = self.start.get(worker, StreamPosition())
        shard_damage, sample_damage = DamageCounter("damaged shard data"), DamageCounter("undecodable sample")
        reads = [0]
        shards = islice(shard_sequence(self.urls, self.probs, self.epoch_seed), stream, None, n_streams)
        shuffle_rng = random.Random(epoch_seed(self.epoch_seed, stream))
        samples = _raw_samples(shards, shard_damage, self.expected, reads)
        if self.per_caption:
            samples = _per_caption(samples)
        raw = wds.shuffle(self.cfg.shuffle_buffer, self.cfg.shuffle_initial, rng=shuffle_rng)(samples)
        raw_pos = pos.raw_pos
        for _ in islice(raw, raw_pos):  # resume: read past what the interrupted run consumed, without decoding
            pass
        reported = (0, 0, 0)
        clips: list[_Clip] = []
        rows = _RowBuffers()
        for batches_done in range(pos.batches_done, quota):
            # In a worker the crops are decoded straight into the batch's shared-memory slot (`_BlockRows`), one
            # row of the full crop length per clip; otherwise into reused row buffers that `collate` copies.
            block, slot = None, None
            if self.pcm_slots is not None:
                block, slot = self.pcm_slots.acquire(
                    worker_id, self.batch_size, self.crop_samples, self.batch_size * self.crop_samples
                )
            into = rows if block is None else _BlockRows(block)
            while len(clips) < self.batch_size:
                sample = next(raw)
                raw_pos += 1
                try:
                    clips.append(self._clip(sample, into, len(clips)))
                except Exception as exn:  # a damaged sample: counted and skipped
                    sample_damage.url = sample.get("__url__", "?")
                    sample_damage.record(exn)
            if block is None:
                batch = collate(clips, self.cfg.max_captions)
            else:
                batch = collate(clips, self.cfg.max_captions, into.batch([len(c.pcm) for c in clips]), True)
            batch.slot = slot
            clips = []
            counts = (shard_damage.count, sample_damage.count, reads[0])
            batch.info = StreamInfo(
                worker=worker,
                batches_done=batches_done + 1,
                raw_pos=raw_pos,
                damaged_shards=counts[0] - reported[0],
                bad_samples=counts[1] - reported[1],
                shard_reads=counts[2] - reported[2],
            )
            reported = counts
            yield batch


class ValStream(IterableDataset):
    """Validation batches: every clip of the validation shards exactly once over all ranks and workers."""

    def __init__(self, sets: Sequence[ShardSet], cfg: DataConfig, rank: int, world_size: int) -> None:
        super().__init__()
        self.urls = [u for s in sets for u in s.urls]
        self.expected = {u: n for s in sets for u, n in zip(s.urls, s.samples)}
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.crop_samples = int(round(cfg.val_crop_s * shard_format.SAMPLE_RATE_HZ))

    def __iter__(self) -> Iterator[Batch]:
        storage.register_webdataset_s3()
        worker, num_workers = _worker()
        urls = self.urls[self.rank :: self.world_size][worker::num_workers]
        damage = DamageCounter("damaged validation shard data")
        clips: list[_Clip] = []
        rows = _RowBuffers()
        for raw in _raw_samples(enumerate(urls), damage, self.expected, [0]):
            try:
                sample = _decode(raw, self.cfg.sbert_dim)
                pcm = read_flac_window(sample.flac, 0, rows.row(len(clips), min(sample.frames, self.crop_samples)))
            except Exception as exn:
                damage.url = raw.get("__url__", "?")
                damage.record(exn)
                continue
            clips.append(
                _Clip(
                    key=sample.key,
                    clip_id=sample.meta.clip_id,
                    pcm=pcm,
                    caption=sample.meta.captions[0],
                    caption_sbert=sample.sbert[0].astype(np.float32),
                    all_sbert=sample.sbert.astype(np.float32),
                    all_captions=list(sample.meta.captions),
                    source_file=sample.meta.source_file,
                )
            )
            if len(clips) == self.cfg.val_batch_size:
                yield self._batch(clips)
                clips = []
        if clips:
            yield self._batch(clips)

    def _batch(self, clips: list[_Clip]) -> Batch:
        batch = collate(clips, max(len(c.all_captions) for c in clips))
        batch.all_captions = [c.all_captions for c in clips]
        batch.source_files = [c.source_file for c in clips]
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation shards


def open_eval_shards(paths: Sequence[str], what: str = "--shards") -> list[ShardSet]:
    """Shard directories to evaluate or index; they must agree on the Sentence-BERT dimension (every sample is checked
    against it)."""
    sets = [open_shard_dir(p, None, what=what) for p in paths]
    dims = {s.manifest.sbert_dim for s in sets}
    if len(dims) > 1:
        raise ValueError(f"{what} mix Sentence-BERT dimensions {sorted(dims)}; evaluate them separately")
    return sets


def eval_data_config(
    sets: Sequence[ShardSet], max_duration_s: float, batch_size: int, num_workers: int, prefetch_factor: int = 2
) -> DataConfig:
    """The streaming settings to read evaluation shard sets with ValStream: clips cut to their first
    `max_duration_s` seconds, `batch_size` clips per batch."""
    return DataConfig(
        sbert_dim=sets[0].manifest.sbert_dim,
        val_crop_s=max_duration_s,
        val_batch_size=batch_size,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Loaders


def _worker_init(_: int) -> None:
    # The scheduler's SIGTERM/SIGUSR1 reach every process of the job; the training process handles them and shuts
    # its workers down itself (`BatchLoader.close`, which kills a worker that does not stop), so a worker must not
    # die of them first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    torch.set_num_threads(1)


class BatchLoader:
    """A DataLoader over a stream that yields whole batches, with a `close()` that always ends its worker processes.

    The workers ignore SIGTERM (see `_worker_init`), so the DataLoader's own shutdown, which ends a worker that does
    not stop with SIGTERM, and Python's exit, which then waits for it, could wait for ever. `close` (also on
    exceptions, as a context manager) stops them the DataLoader's way, then kills whichever is still alive."""

    def __init__(self, dataset: IterableDataset, cfg: DataConfig, pin_memory: bool = False) -> None:
        workers = cfg.num_workers
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=cfg.prefetch_factor if workers else None,
            persistent_workers=False,
            pin_memory=pin_memory,
            worker_init_fn=_worker_init if workers else None,
            generator=torch.Generator().manual_seed(0),
        )
        self._iterators: list[Any] = []
        self._slots: list[PcmSlots] = []

    def __iter__(self) -> Iterator[Batch]:
        """The batches; a training stream read by workers writes them into reused shared-memory slots, new ones for
        each iteration (`PcmSlots`), and every batch comes out of here with its PCM in memory of its own."""
        dataset, slots = self.loader.dataset, None
        if self.loader.num_workers and isinstance(dataset, TrainStream):
            slots = dataset.pcm_slots = PcmSlots(self.loader.num_workers, self.loader.prefetch_factor + 1)
            self._slots.append(slots)
        it = iter(self.loader)
        self._iterators.append(it)
        return it if slots is None else map(slots.release, it)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker this loader started: the DataLoader's shutdown, then SIGKILL for any left."""
        while self._iterators:
            it = self._iterators.pop()
            workers = list(getattr(it, "_workers", []))
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            for w in workers:
                w.join(timeout=timeout_s if w.is_alive() else 0)
                if w.is_alive():
                    w.kill()
                    w.join(timeout=timeout_s)
        while self._slots:
            self._slots.pop().close()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_loader(dataset: IterableDataset, cfg: DataConfig, pin_memory: bool = False) -> BatchLoader:
    """A loader over a stream that yields whole batches; it never touches the global torch RNG."""
    return BatchLoader(dataset, cfg, pin_memory)


def steps_per_epoch(samples_per_epoch: int, global_batch_size: int) -> int:
    steps = samples_per_epoch // global_batch_size
    if steps < 1:
        raise ConfigError(
            f"an epoch of {samples_per_epoch} samples (data.samples_per_epoch, or the training manifests' total) is "
            f"smaller than train.global_batch_size={global_batch_size}: it would have no step"
        )
    return steps
