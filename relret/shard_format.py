"""The shard format: written by `shards/`, read by `relret/data.py`. This module is the only place it is defined.

A shard is a WebDataset tar named `{dataset}-{split}-{index:06d}.tar` holding one sample per clip. A sample's key is
`{dataset}-{clip_id}` (no dots: WebDataset ends a key at the first dot) and its members are:

- `{key}.flac`: the clip, mono, 32 kHz, 16-bit FLAC, at most the shard job's `--max-duration-s` long;
- `{key}.json`: `SampleMeta` (captions, clip_id, dataset, split, source file name, duration_s, sample_rate);
- `{key}.sbert.npy`: float16 [n_captions, D], the Sentence-BERT embedding of each caption, in caption order.

Beside the shards, `manifest.json` (see `Manifest`) lists every shard with its sample count, bytes and sha256, the
totals, the embedding model and dimension, the job's config, and every skipped input with its reason. One output
directory holds one (dataset, split); the convention is `{root}/{dataset}/{split}/`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from relret.flac_crop import FlacData

FORMAT_VERSION = 1
SAMPLE_RATE_HZ = 32_000
MANIFEST_NAME = "manifest.json"
AUDIO_EXT = "flac"
META_EXT = "json"
SBERT_EXT = "sbert.npy"
MEMBERS = (AUDIO_EXT, META_EXT, SBERT_EXT)
SHARD_PATTERN = "{dataset}-{split}-{index:06d}.tar"
_NAME_RE = re.compile(r"^[a-z0-9_]+$")


def check_name(kind: str, value: str) -> str:
    """Dataset and split names go into keys and file names: lower-case letters, digits and underscores only."""
    if not _NAME_RE.match(value):
        raise ValueError(f"{kind} name {value!r} must match [a-z0-9_]+ (it is part of sample keys and shard names)")
    return value


def stable_clip_id(dataset: str, source_name: str) -> int:
    """A stable non-negative 63-bit integer id for a clip: the same dataset and source file name give the same id on
    any machine and in any Python process (unlike hash())."""
    digest = hashlib.blake2b(f"{dataset}\0{source_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def sample_key(dataset: str, clip_id: int) -> str:
    return f"{check_name('dataset', dataset)}-{clip_id}"


def shard_name(dataset: str, split: str, index: int) -> str:
    return SHARD_PATTERN.format(dataset=check_name("dataset", dataset), split=check_name("split", split), index=index)


def shard_glob(dataset: str, split: str) -> str:
    return f"{check_name('dataset', dataset)}-{check_name('split', split)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"


@dataclasses.dataclass
class SampleMeta:
    """The `json` member of a sample."""

    captions: list[str]
    clip_id: int
    dataset: str
    split: str
    source_file: str
    duration_s: float
    sample_rate: int = SAMPLE_RATE_HZ

    def __post_init__(self) -> None:
        if not self.captions or not all(isinstance(c, str) and c.strip() for c in self.captions):
            raise ValueError(f"clip {self.source_file!r}: every sample needs at least one non-empty caption")


def encode_flac(audio: np.ndarray, sample_rate: int = SAMPLE_RATE_HZ) -> bytes:
    """float mono audio in [-1, 1] -> 16-bit FLAC bytes (values outside are clipped)."""
    import soundfile as sf

    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [T], got shape {audio.shape}")
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC bytes -> (float32 mono audio [T], sample rate)."""
    import soundfile as sf

    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    if audio.ndim != 1:
        audio = audio.mean(axis=1)
    return audio, int(sr)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, Fortran order) of an .npy header, parsed by numpy (an ast.literal_eval): cached, because every
    sample with as many captions has the same header, and the parse costs a fifth of a millisecond."""
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError("the .npy data holds Python objects (would need pickles): refused")
    return dtype, shape, fortran_order


def decode_npy(data: bytes) -> np.ndarray:
    """.npy bytes -> a read-only array over them (no pickles: object arrays are refused). Raises ValueError for data
    that is not .npy or is shorter than its header says."""
    if data[: len(_NPY_MAGIC)] != _NPY_MAGIC or len(data) < 10:
        raise ValueError(f"not .npy data (starts with {bytes(data[:8])!r})")
    length_bytes = 2 if data[6] == 1 else 4  # format 1.0: 2-byte header length, 2.0 and 3.0: 4 bytes
    end = 8 + length_bytes + int.from_bytes(data[8 : 8 + length_bytes], "little")
    dtype, shape, fortran_order = _npy_header(bytes(data[:end]))
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(
            f".npy data of {len(data) - end} bytes after its header, {shape} {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape, order="F" if fortran_order else "C")


def encode_sample(meta: SampleMeta, flac: bytes, sbert: np.ndarray) -> dict[str, Any]:
    """The dict `webdataset.TarWriter.write` takes for one clip."""
    if sbert.ndim != 2 or sbert.shape[0] != len(meta.captions):
        raise ValueError(f"sbert must be [n_captions={len(meta.captions)}, D], got {sbert.shape}")
    return {
        "__key__": sample_key(meta.dataset, meta.clip_id),
        AUDIO_EXT: flac,
        META_EXT: json.dumps(dataclasses.asdict(meta), ensure_ascii=False).encode("utf-8"),
        SBERT_EXT: encode_npy(sbert.astype(np.float16)),
    }


@dataclasses.dataclass
class Sample:
    """One decoded sample."""

    key: str
    audio: np.ndarray
    """float32 mono [T] at `meta.sample_rate`."""
    meta: SampleMeta
    sbert: np.ndarray
    """float16 [n_captions, D]."""


@dataclasses.dataclass
class EncodedSample:
    """One sample with its audio still FLAC (decode the part you need with relret.flac_crop)."""

    key: str
    flac: FlacData
    """The FLAC bytes, or where they lie in a local shard (`relret.tar_member.TarMember`, read on demand)."""
    frames: int
    """Frames of the clip, from the FLAC header."""
    meta: SampleMeta
    sbert: np.ndarray
    """float16 [n_captions, D]."""


def decode_sample_encoded(raw: dict[str, Any]) -> EncodedSample:
    """A raw WebDataset sample (member name -> bytes) -> `EncodedSample`, reading only the FLAC header. Raises
    ValueError naming the key when a member is missing or inconsistent."""
    from relret.flac_crop import flac_info

    key = raw.get("__key__", "?")
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise ValueError(f"sample {key} lacks member(s) {', '.join(missing)}")
    meta = SampleMeta(**json.loads(raw[META_EXT]))
    info = flac_info(raw[AUDIO_EXT])
    if info.sample_rate_hz != meta.sample_rate:
        raise ValueError(f"sample {key}: FLAC is {info.sample_rate_hz} Hz but its json says {meta.sample_rate} Hz")
    sbert = decode_npy(raw[SBERT_EXT])
    if sbert.ndim != 2 or sbert.shape[0] != len(meta.captions):
        raise ValueError(f"sample {key}: sbert.npy is {sbert.shape} for {len(meta.captions)} captions")
    return EncodedSample(key, raw[AUDIO_EXT], info.frames, meta, sbert)


def decode_sample(raw: dict[str, Any]) -> Sample:
    """A raw WebDataset sample (member name -> bytes) -> `Sample` with the whole clip decoded. Raises ValueError
    naming the key when a member is missing or inconsistent."""
    sample = decode_sample_encoded(raw)
    flac = sample.flac if isinstance(sample.flac, bytes) else sample.flac.read()
    return Sample(sample.key, decode_flac(flac)[0], sample.meta, sample.sbert)


@dataclasses.dataclass
class ShardInfo:
    """One shard in the manifest."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclasses.dataclass
class SkippedInput:
    """An input clip left out of the shards, and why."""

    source: str
    reason: str


@dataclasses.dataclass
class Manifest:
    """`manifest.json`: what a shard directory holds."""

    dataset: str
    split: str
    sbert_model: str
    sbert_dim: int
    shards: list[ShardInfo]
    skipped: list[SkippedInput]
    config: dict[str, Any]
    total_samples: int = 0
    total_bytes: int = 0
    format_version: int = FORMAT_VERSION
    sample_rate: int = SAMPLE_RATE_HZ

    def __post_init__(self) -> None:
        self.total_samples = sum(s.samples for s in self.shards)
        self.total_bytes = sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {data.get('format_version')!r}, this code reads {FORMAT_VERSION}")
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            data["skipped"] = [SkippedInput(**s) for s in data["skipped"]]
            data.pop("total_samples", None)
            data.pop("total_bytes", None)
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source} is not a relret shard manifest: {exc}") from exc


def read_manifest(directory: str) -> Manifest:
    """The manifest of a shard directory (local or s3://)."""
    from relret import storage

    url = storage.join(directory, MANIFEST_NAME)
    if not storage.exists(url):
        raise ValueError(f"no {MANIFEST_NAME} in {directory}; build the shards with `python shards/build.py` first")
    return Manifest.from_json(storage.read_bytes(url).decode("utf-8"), url)


def sha256_of(url: str) -> str:
    from relret import storage

    h = hashlib.sha256()
    with storage.open_read(url) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
