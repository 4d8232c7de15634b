"""Readers for the datasets' caption metadata: Clotho CSV, AudioCaps CSV, WavCaps JSON, and a user's own folder.

Each reader turns one metadata file into a `Catalog`: the clips to shard (`ClipSpec`: source name, audio path,
captions in file order) plus the inputs left out with the reason. Audio is not touched here; the shard workers open
it. A metadata file that cannot be parsed at all raises ValueError naming the file and line; a single unusable row or
item skips that clip only. Clips are keyed by their audio file name, never by caption text (captions repeat).

Layouts (real files in ../shared/data, described in its README):

- clotho: `file_name,caption_1..caption_5`; audio `{audio_dir}/{file_name}`.
- audiocaps: `audiocap_id,youtube_id,start_time,caption`, one row per caption (one caption per train clip, five per
  val/test clip), grouped by (youtube_id, start_time); audio `{audio_dir}/{youtube_id}_{start_time}.wav` by default.
- wavcaps: `{"num_captions_per_audio": n, "data": [{"id", "caption" (or caption_1..k), ...}]}` for the FreeSound,
  BBC, SoundBible and AudioSet_SL subsets; audio `{audio_dir}/{stem}.flac` by default, where stem is the id without a
  `.wav` suffix (AudioSet_SL ids look like `Y<ytid>.wav`). The blacklist files (`{"AudioSet": ["Y<ytid>.wav", ..],
  "FreeSound": ["<id>", ..]}`) remove clips that overlap the Clotho/AudioCaps test sets before anything is read.
- folder: audio files under `audio_dir` plus a CSV (`file_name` and `caption` or `caption_1..k`) or a JSON (an object
  `{file_name: caption or [captions]}`, or a list of `{"file_name", "caption" or "captions"}`, optionally under
  `"data"`); rows naming the same file are grouped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from relret.captions import caption_columns, caption_problem, is_valid_utf8, read_caption_rows, read_csv_rows
from relret.shard_format import SkippedInput

DATASETS = ("clotho", "audiocaps", "wavcaps", "folder")
AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
AUDIOCAPS_TEMPLATE = "{youtube_id}_{start_time}.wav"
WAVCAPS_TEMPLATE = "{stem}.flac"
WAVCAPS_SUBSETS = {
    # subset name -> (file name prefix of the official JSON, blacklist key that applies to it)
    "freesound": ("fsd", "FreeSound"),
    "bbc": ("bbc", "BBC"),
    "soundbible": ("sb", "SoundBible"),
    "audioset_sl": ("as", "AudioSet"),
}
_WAVCAPS_KEEP = {"data", "id", "caption", "audio", "wav", "file_name", "duration"}


@dataclasses.dataclass(frozen=True, slots=True)
class ClipSpec:
    """One clip to shard: where its audio is and what its captions are."""

    source: str
    """Name recorded in the sample (`source_file`) and hashed into the clip id; unique within the dataset."""
    audio_path: str
    """Path of the audio file relative to the job's --audio-dir."""
    captions: tuple[str, ...]


@dataclasses.dataclass
class Catalog:
    """What a metadata file holds: clips to shard, and inputs left out (with the reason)."""

    clips: list[ClipSpec]
    skipped: list[SkippedInput]
    """Bad input (these count towards --max-skipped-fraction)."""
    excluded: list[SkippedInput] = dataclasses.field(default_factory=list)
    """Clips left out on purpose (a blacklist), not counted as bad input."""

    @property
    def total(self) -> int:
        """Clips that were candidates for the shards (kept or skipped as bad input)."""
        return len(self.clips) + len(self.skipped)


class _Builder:
    """Collects clips, refusing a second clip with the same source name (that would repeat a clip id)."""

    def __init__(self) -> None:
        self.catalog = Catalog([], [])
        self._where: dict[str, str] = {}

    def add(self, source: str, audio_path: str, captions: Sequence[object], where: str) -> None:
        if source in self._where:
            self.catalog.skipped.append(SkippedInput(source, f"{where}: duplicate of {self._where[source]}"))
            return
        self._where[source] = where
        if (problem := caption_problem(captions)) is not None:
            self.catalog.skipped.append(SkippedInput(source, f"{where}: {problem}"))
            return
        self.catalog.clips.append(ClipSpec(source, audio_path, tuple(captions)))  # type: ignore[arg-type]

    def skip(self, source: str, reason: str) -> None:
        self.catalog.skipped.append(SkippedInput(source, reason))


def read_clotho(path: str | os.PathLike) -> Catalog:
    """Clotho captions CSV: one row and five captions per clip."""
    out = _Builder()
    name = Path(path).name
    for row in read_caption_rows(path):
        where = f"{name}:{row.line}"
        if not row.file_name or not is_valid_utf8(row.file_name):
            out.skip(where, row.problem or "empty file_name")
        else:
            out.add(row.file_name, row.file_name, row.captions, where)  # checks the captions
    return out.catalog


def read_audiocaps(path: str | os.PathLike, template: str = AUDIOCAPS_TEMPLATE) -> Catalog:
    """AudioCaps CSV: one row per caption, grouped into clips by (youtube_id, start_time) in order of appearance."""
    name = Path(path).name
    _check_template(template, {"youtube_id": "x", "start_time": "0"})
    header, rows = read_csv_rows(path, AUDIOCAPS_COLUMNS, "audiocap_id,youtube_id,start_time,caption (AudioCaps)")
    groups: dict[tuple[str, str], tuple[int, list[str]]] = {}
    out = _Builder()
    for row in rows:
        where = f"{name}:{row.line}"
        if row.problem:
            out.skip(where, row.problem)
            continue
        ytid, start = row.fields["youtube_id"].strip(), row.fields["start_time"].strip()
        if not ytid or not start or not is_valid_utf8(ytid + start):
            out.skip(where, "youtube_id or start_time is empty or not valid UTF-8")
            continue
        groups.setdefault((ytid, start), (row.line, []))[1].append(row.fields["caption"])
    for (ytid, start), (line, captions) in groups.items():
        file_name = template.format(youtube_id=ytid, start_time=start)
        out.add(file_name, file_name, captions, f"{name}:{line}")
    return out.catalog


def wavcaps_subset(path: str | os.PathLike) -> str:
    """The WavCaps subset an official JSON file belongs to, from its name (fsd_final.json -> freesound, ...)."""
    stem = Path(path).name.lower()
    for subset, (prefix, key) in WAVCAPS_SUBSETS.items():
        if stem.startswith(prefix + "_") or stem.startswith(subset) or stem.startswith(key.lower()):
            return subset
    raise ValueError(
        f"cannot tell which WavCaps subset {path} holds from its name; pass --wavcaps-subset "
        f"({', '.join(WAVCAPS_SUBSETS)})"
    )


def read_blacklists(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, str]]:
    """blacklist key ("AudioSet", "FreeSound") -> {id: name of the blacklist file that lists it}."""
    out: dict[str, dict[str, str]] = {}
    for path in paths:
        data = _load_json(path)
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: a WavCaps blacklist is an object of lists, e.g. {{'FreeSound': ['123', ..]}}")
        for key, ids in data.items():
            for clip in ids:
                out.setdefault(key, {}).setdefault(str(clip), Path(path).name)
    return out


def read_wavcaps(
    path: str | os.PathLike,
    subset: str | None = None,
    blacklists: Sequence[str | os.PathLike] = (),
    template: str = WAVCAPS_TEMPLATE,
) -> Catalog:
    """A WavCaps JSON file (one subset), with the blacklisted clips excluded.

    Source names are `{subset}/{file name}` so that ids stay distinct across subsets (FreeSound and SoundBible both
    have an item "2219").
    """
    subset = subset or wavcaps_subset(path)
    if subset not in WAVCAPS_SUBSETS:
        raise ValueError(f"unknown WavCaps subset {subset!r}; choose one of {', '.join(WAVCAPS_SUBSETS)}")
    _check_template(template, {"id": "x", "stem": "x"})
    # Keep only the fields used: the FreeSound file holds long descriptions and tags for 262k clips.
    data = _load_json(path, object_hook=_wavcaps_fields)
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{path}: a WavCaps JSON file is an object with a 'data' list of clips")
    banned = read_blacklists(blacklists).get(WAVCAPS_SUBSETS[subset][1], {})
    name = Path(path).name
    out = _Builder()
    for i, item in enumerate(items):
        where = f"{name}: data[{i}]"
        clip_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(clip_id, str | int) or not str(clip_id).strip():
            out.skip(where, "item has no id")
            continue
        clip_id = str(clip_id).strip()
        stem = clip_id[: -len(".wav")] if clip_id.lower().endswith(".wav") else clip_id
        file_name = template.format(id=clip_id, stem=stem)
        source = f"{subset}/{file_name}"
        if clip_id in banned:
            out.catalog.excluded.append(SkippedInput(source, f"blacklisted ({banned[clip_id]})"))
            continue
        out.add(source, file_name, _item_captions(item), where)
    return out.catalog


def read_folder(path: str | os.PathLike) -> Catalog:
    """A user's captions for a folder of audio files: CSV (`file_name` + `caption` or `caption_1..k`) or JSON."""
    path = Path(path)
    groups: dict[str, tuple[str, list[Any]]] = {}
    out = _Builder()
    if path.suffix.lower() == ".csv":
        what = "file_name and caption (one row per caption) or caption_1..caption_k (one row per clip)"
        header, rows = read_csv_rows(path, ("file_name",), what)
        columns = caption_columns(header) or (["caption"] if "caption" in header else [])
        if not columns:
            raise ValueError(f"{path}:1: header has no caption column; expected {what}")
        for row in rows:
            where = f"{path.name}:{row.line}"
            if row.problem:
                out.skip(where, row.problem)
                continue
            file_name = row.fields["file_name"].strip()
            if not file_name or not is_valid_utf8(file_name):
                out.skip(where, "file_name is empty or not valid UTF-8")
                continue
            groups.setdefault(file_name, (where, []))[1].extend(row.fields[c] for c in columns)
    else:
        data = _load_json(path)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, dict):
            entries = [(f"{path.name}: {k!r}", {"file_name": k, "captions": v}) for k, v in data.items()]
        elif isinstance(data, list):
            entries = [(f"{path.name}: [{i}]", item) for i, item in enumerate(data)]
        else:
            raise ValueError(f"{path}: expected a JSON object {{file_name: captions}} or a list of clips")
        for where, item in entries:
            file_name = item.get("file_name") if isinstance(item, dict) else None
            if not isinstance(file_name, str) or not file_name.strip() or not is_valid_utf8(file_name):
                out.skip(where, "item has no file_name")
                continue
            captions = item.get("captions", item.get("caption"))
            captions = captions if isinstance(captions, list) else [] if captions is None else [captions]
            groups.setdefault(file_name.strip(), (where, []))[1].extend(captions)
    for file_name, (where, captions) in groups.items():
        out.add(file_name, file_name, captions, where)
    return out.catalog


def read_catalog(
    dataset: str,
    captions: str | os.PathLike,
    *,
    audio_template: str | None = None,
    wavcaps_subset: str | None = None,
    blacklists: Sequence[str | os.PathLike] = (),
) -> Catalog:
    """The reader for `dataset`, applied to the metadata file `captions` (a local path)."""
    if not Path(captions).is_file():
        raise ValueError(f"captions file {captions} does not exist (pass the dataset's metadata CSV/JSON)")
    if blacklists and dataset != "wavcaps":
        raise ValueError("--blacklist applies to WavCaps only")
    if dataset == "clotho":
        return read_clotho(captions)
    if dataset == "audiocaps":
        return read_audiocaps(captions, audio_template or AUDIOCAPS_TEMPLATE)
    if dataset == "wavcaps":
        return read_wavcaps(captions, wavcaps_subset, blacklists, audio_template or WAVCAPS_TEMPLATE)
    if dataset == "folder":
        return read_folder(captions)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _wavcaps_fields(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k in _WAVCAPS_KEEP or k.startswith("caption_")}


def _item_captions(item: dict[str, Any]) -> list[Any]:
    if "caption" in item:
        return item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
    return [item[c] for c in caption_columns(list(item))]


def _check_template(template: str, fields: dict[str, str]) -> None:
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"audio file-name template {template!r} is invalid ({exc}); it may use {', '.join('{' + f + '}' for f in fields)}"
        ) from None


def _load_json(path: str | os.PathLike, **kwargs: Any) -> Any:
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
