"""Readers for the datasets' caption metadata: Clotho CSV, AudioCaps CSV, WavCaps JSON, and a user's own folder.

`READERS` is the one list of dataset names (`--dataset`): each `Reader` registers itself there with the dataclass of
its own options (`AudioCapsOptions`, `WavCapsOptions`, ...) and turns one metadata file into a `Catalog`: the clips to
shard (`ClipSpec`: source name, audio path, captions in file order) plus the inputs left out with the reason. A
reader also says where its audio is below --audio-dir (`Reader.audio_root`), how many missing audio files are normal
for it (`Reader.max_missing_fraction`), and which split a metadata file holds when its name does not tell.

Audio is not read here; the shard workers open it. A metadata file that cannot be parsed at all raises ValueError
naming the file and line; a single unusable row or item skips that clip only. Clips are keyed by their audio file
name, never by caption text (captions repeat).

Layouts (real files in ../shared/data, described in its README):

- clotho: `file_name,caption_1..caption_5`; audio `{audio_dir}/{file_name}`.
- audiocaps: `audiocap_id,youtube_id,start_time,caption`, one row per caption (one caption per train clip, five per
  val/test clip), grouped by (youtube_id, start_time); audio `{audio_dir}/{youtube_id}_{start_time}.wav` by default,
  or any `--audio-template` of {audiocap_id}, {youtube_id}, {start_time} (`AudioCapsOptions`).
- wavcaps: `{"num_captions_per_audio": n, "data": [{"id", "caption" (or caption_1..k), ...}]}` for the FreeSound,
  BBC, SoundBible and AudioSet_SL subsets; audio `{stem}.flac`, where stem is the id without a `.wav` suffix
  (AudioSet_SL ids look like `Y<ytid>.wav`), in the subset's folder: --audio-dir itself, or the `{Subset}_flac`
  folder found below it (the official zips unpack to `mnt/fast/nobackup/scratch4weeks/xm00178/WavCaps/data/
  waveforms/{Subset}_flac/`). Blacklists remove clips before anything is read: WavCaps' JSON files
  (`{"AudioSet": ["Y<ytid>.wav", ..], "FreeSound": ["<id>", ..]}`, the clips that overlap the Clotho/AudioCaps test
  sets) and CSV files of Freesound ids (one header row, the id in the first column, e.g. DCASE 2024 task 6's
  `dcase2024_task6_excluded_freesound_ids.csv`), which filter the FreeSound subset only.
- folder: audio files under `audio_dir` plus a CSV (`file_name` and `caption` or `caption_1..k`) or a JSON (an object
  `{file_name: caption or [captions]}`, or a list of `{"file_name", "caption" or "captions"}`, optionally under
  `"data"`); rows naming the same file are grouped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from relret import storage
from relret.captions import caption_columns, caption_problem, is_valid_utf8, read_caption_rows, read_csv_rows
from relret.config import ConfigError, from_dict
from relret.shard_format import SkippedInput
from shards.audio_layout import find_folders

AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
AUDIOCAPS_TEMPLATE = "{youtube_id}_{start_time}.wav"
AUDIOCAPS_FIELDS = ("audiocap_id", "youtube_id", "start_time")
WAVCAPS_TEMPLATE = "{stem}.flac"
WAVCAPS_FIELDS = ("id", "stem")
WAVCAPS_SUBSETS = {
    # subset name -> (file name prefix of the official JSON, blacklist key that applies to it)
    "freesound": ("fsd", "FreeSound"),
    "bbc": ("bbc", "BBC"),
    "soundbible": ("sb", "SoundBible"),
    "audioset_sl": ("as", "AudioSet"),
}
WAVCAPS_AUDIO_FOLDERS = {
    # subset name -> the folder its official zip archive unpacks the FLAC files into
    "freesound": "FreeSound_flac",
    "bbc": "BBC_Sound_Effects_flac",
    "soundbible": "SoundBible_flac",
    "audioset_sl": "AudioSet_SL_flac",
}
WAVCAPS_SEARCH_DEPTH = 12
"""Folder levels below --audio-dir searched for a WavCaps `{Subset}_flac` folder (the unpacked archives put it 9 levels
down: mnt/fast/nobackup/scratch4weeks/xm00178/WavCaps/data/waveforms/FreeSound_flac)."""
WAVCAPS_PROBE_CLIPS = 20
"""Clips whose audio is looked for directly in --audio-dir before its subfolders are searched."""
_WAVCAPS_KEEP = {"data", "id", "caption", "audio", "wav", "file_name", "duration"}


@dataclasses.dataclass(frozen=True, slots=True)
class ClipSpec:
    """One clip to shard: where its audio is and what its captions are."""

    source: str
    """Name recorded in the sample (`source_file`) and hashed into the clip id; unique within the dataset."""
    audio_path: str
    """Path of the audio file relative to the dataset's audio root (--audio-dir, or the folder found below it)."""
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


# ---------------------------------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass
class NoOptions:
    """The options of a reader that takes none."""


class Reader:
    """One dataset layout. Subclasses set `name` (the --dataset value), `title`, `Options` (the dataclass of their own
    options, whose field names are the shard job's flags) and implement `read`; `register_reader` adds them to
    READERS."""

    name: ClassVar[str]
    title: ClassVar[str]
    """The dataset's name in messages ("AudioCaps")."""
    Options: ClassVar[type] = NoOptions
    """Dataclass of this reader's options (their field names are the shard job's flags)."""
    max_missing_fraction: ClassVar[float] = 0.01
    """Default of --max-missing-fraction: the share of clips whose audio file may be absent."""

    def read(self, path: Path, options: Any) -> Catalog:
        """The clips of the metadata file `path` (a local file)."""
        raise NotImplementedError

    def default_split(self, path: Path, options: Any) -> str | None:
        """The split a metadata file holds when its name alone does not say it (None: use the file name)."""
        return None

    def audio_root(self, audio_dir: str, path: Path, options: Any, catalog: Catalog) -> str:
        """The folder the clips' `audio_path`s are relative to, given --audio-dir (local or s3://) and the catalog
        read from the metadata file `path`."""
        return audio_dir

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.Options))

    def make_options(self, given: Mapping[str, Any] | None = None) -> Any:
        """This reader's options from the option values that were set (by flag name); the rest keep their defaults.
        A value set for an option this reader does not have is refused, naming the readers that have it."""
        given = dict(given or {})
        foreign = [k for k in given if k not in self.option_names()]
        if foreign:
            flag = "--" + foreign[0].replace("_", "-")
            owners = [r.title for r in READERS.values() if foreign[0] in r.option_names()]
            own = ", ".join("--" + n.replace("_", "-") for n in self.option_names()) or "no options"
            where = f"applies to {' and '.join(owners)} only" if owners else "is not a reader option"
            raise ConfigError(f"{flag} {where}; {self.title} takes {own}")
        try:
            return from_dict(self.Options, given)
        except ConfigError as exc:
            # A check in the options' own __post_init__ says what is wrong in its own words.
            cause = exc.__cause__
            raise ConfigError(str(cause) if isinstance(cause, ValueError) else str(exc)) from None


READERS: dict[str, Reader] = {}
"""--dataset name -> its reader; the only list of dataset names."""


def register_reader(cls: type[Reader]) -> type[Reader]:
    """Class decorator: add a reader to READERS under its `name`."""
    if cls.name in READERS and type(READERS[cls.name]) is not cls:
        raise ValueError(f"dataset reader {cls.name!r} is already registered ({type(READERS[cls.name]).__name__})")
    READERS[cls.name] = cls()
    return cls


def get_reader(dataset: str) -> Reader:
    """The reader registered for `dataset`; ValueError listing the registered names otherwise."""
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(READERS)}")
    return READERS[dataset]


def read_catalog(
    dataset: str,
    captions: str | os.PathLike,
    options: Any = None,
    *,
    audio_template: str | None = None,
    wavcaps_subset: str | None = None,
    blacklists: Sequence[str | os.PathLike] = (),
) -> Catalog:
    """The reader for `dataset`, applied to the metadata file `captions` (a local path). `options` is the reader's
    options object (None: its defaults); the keyword arguments set single options instead, by flag name."""
    if not Path(captions).is_file():
        raise ValueError(f"captions file {captions} does not exist (pass the dataset's metadata CSV/JSON)")
    reader = get_reader(dataset)
    if options is None:
        given = {
            "audio_template": audio_template,
            "wavcaps_subset": wavcaps_subset,
            "blacklist": [str(b) for b in blacklists],
        }
        options = reader.make_options({k: v for k, v in given.items() if v not in (None, [])})
    return reader.read(Path(captions), options)


# ---------------------------------------------------------------------------------------------------------------------
# Clotho


@register_reader
class ClothoReader(Reader):
    """Clotho captions CSV: one row and five captions per clip; audio `{audio_dir}/{file_name}`."""

    name = "clotho"
    title = "Clotho"

    def read(self, path: Path, options: Any) -> Catalog:
        return read_clotho(path)


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


# ---------------------------------------------------------------------------------------------------------------------
# AudioCaps


@dataclasses.dataclass
class AudioCapsOptions:
    """Where an AudioCaps clip's audio file is."""

    audio_template: str = AUDIOCAPS_TEMPLATE
    """File name from {audiocap_id} (of the clip's first caption row), {youtube_id}, {start_time}: e.g.
    {youtube_id}_{start_time}.wav (default; aac-datasets writes .flac), Y{youtube_id}.wav (WavCaps/PANNs download
    scripts), {audiocap_id}.wav (audiocaps-download)."""

    def __post_init__(self) -> None:
        check_template(self.audio_template, AUDIOCAPS_FIELDS, "AudioCaps")


@register_reader
class AudioCapsReader(Reader):
    """AudioCaps CSV, one row per caption."""

    name = "audiocaps"
    title = "AudioCaps"
    Options = AudioCapsOptions
    # The clips are cut from YouTube videos, some of which are gone: the authors' own copy misses 2.6% of the train
    # clips, downloads made today miss more.
    max_missing_fraction = 0.05

    def read(self, path: Path, options: AudioCapsOptions) -> Catalog:
        return read_audiocaps(path, options.audio_template)


def read_audiocaps(path: str | os.PathLike, template: str = AUDIOCAPS_TEMPLATE) -> Catalog:
    """AudioCaps CSV: one row per caption, grouped into clips by (youtube_id, start_time) in order of appearance; the
    audio file name is `template` filled with the clip's fields ({audiocap_id} from its first row)."""
    name = Path(path).name
    used = check_template(template, AUDIOCAPS_FIELDS, "AudioCaps")
    header, rows = read_csv_rows(path, AUDIOCAPS_COLUMNS, "audiocap_id,youtube_id,start_time,caption (AudioCaps)")
    groups: dict[tuple[str, str], tuple[int, str, list[str]]] = {}
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
        audiocap_id = row.fields["audiocap_id"].strip()
        groups.setdefault((ytid, start), (row.line, audiocap_id, []))[2].append(row.fields["caption"])
    for (ytid, start), (line, audiocap_id, captions) in groups.items():
        where = f"{name}:{line}"
        if not audiocap_id and "audiocap_id" in used:
            out.skip(where, "audiocap_id is empty")
            continue
        file_name = template.format(audiocap_id=audiocap_id, youtube_id=ytid, start_time=start)
        out.add(file_name, file_name, captions, where)
    return out.catalog


# ---------------------------------------------------------------------------------------------------------------------
# WavCaps


@dataclasses.dataclass
class WavCapsOptions:
    """Which WavCaps subset a JSON file holds, which clips to exclude, and the audio file names."""

    wavcaps_subset: str | None = None
    """freesound | bbc | soundbible | audioset_sl; None: from the JSON file name (fsd_final.json, ...)."""
    blacklist: list[str] = dataclasses.field(default_factory=list)
    """Blacklist files: WavCaps JSON ({"FreeSound": [ids], "AudioSet": [ids]}) or CSV of Freesound ids."""
    audio_template: str = WAVCAPS_TEMPLATE
    """File name from {id} (as in the JSON) or {stem} (the id without .wav)."""

    def __post_init__(self) -> None:
        if self.wavcaps_subset is not None and self.wavcaps_subset not in WAVCAPS_SUBSETS:
            raise ValueError(f"--wavcaps-subset {self.wavcaps_subset!r}: choose one of {', '.join(WAVCAPS_SUBSETS)}")
        check_template(self.audio_template, WAVCAPS_FIELDS, "WavCaps")

    def subset(self, path: str | os.PathLike) -> str:
        return self.wavcaps_subset or wavcaps_subset(path)


@register_reader
class WavCapsReader(Reader):
    """A WavCaps JSON file (one subset)."""

    name = "wavcaps"
    title = "WavCaps"
    Options = WavCapsOptions

    def read(self, path: Path, options: WavCapsOptions) -> Catalog:
        return read_wavcaps(path, options.wavcaps_subset, options.blacklist, options.audio_template)

    def default_split(self, path: Path, options: WavCapsOptions) -> str | None:
        return options.subset(path)

    def audio_root(self, audio_dir: str, path: Path, options: WavCapsOptions, catalog: Catalog) -> str:
        """--audio-dir itself when it is the subset's `{Subset}_flac` folder or holds the clips' files directly;
        else the one `{Subset}_flac` folder at most WAVCAPS_SEARCH_DEPTH levels below it (where the official zips
        unpack). Several such folders, or none, raise ValueError naming what was looked for."""
        if not catalog.clips:
            return audio_dir
        subset = options.subset(path)
        folder = WAVCAPS_AUDIO_FOLDERS[subset]
        if _basename(audio_dir).lower() == folder.lower():
            return audio_dir
        probes = [c.audio_path for c in catalog.clips[:WAVCAPS_PROBE_CLIPS]]
        if any(storage.exists(storage.join(audio_dir, p)) for p in probes):
            return audio_dir
        found = find_folders(audio_dir, folder, WAVCAPS_SEARCH_DEPTH)
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(
                f"--audio-dir {audio_dir}: {len(found)} folders named {folder} below it ({', '.join(found[:4])}); "
                f"pass the one that holds the WavCaps {subset} audio as --audio-dir"
            )
        raise ValueError(
            f"--audio-dir {audio_dir}: WavCaps {subset} audio not found: neither {probes[0]} (nor the next "
            f"{len(probes) - 1} clips' files) directly in it, nor a folder {folder} at most {WAVCAPS_SEARCH_DEPTH} "
            f"levels below it (the official archives unpack to mnt/fast/nobackup/scratch4weeks/xm00178/WavCaps/data/"
            f"waveforms/{folder}/). Pass the folder the archives were unpacked in, or the one holding the .flac files"
        )


def _basename(url: str) -> str:
    """The last path component of a local path or s3:// URL."""
    return str(url).rstrip("/").rsplit("/", 1)[-1]


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
    """blacklist key ("AudioSet", "FreeSound") -> {id: name of the blacklist file that lists it}.

    A `.csv` file lists Freesound ids (one header row, the id in the first column: DCASE 2024 task 6's
    dcase2024_task6_excluded_freesound_ids.csv); any other file is a WavCaps blacklist JSON."""
    out: dict[str, dict[str, str]] = {}
    for path in paths:
        if Path(path).suffix.lower() == ".csv":
            for clip in _read_id_csv(path):
                out.setdefault("FreeSound", {}).setdefault(clip, Path(path).name)
            continue
        data = _load_json(path)
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: a WavCaps blacklist is an object of lists, e.g. {{'FreeSound': ['123', ..]}}")
        for key, ids in data.items():
            for clip in ids:
                out.setdefault(key, {}).setdefault(str(clip), Path(path).name)
    return out


def _read_id_csv(path: str | os.PathLike) -> list[str]:
    """The first column of a CSV of Freesound ids, below its header row."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh, strict=True))
    except FileNotFoundError:
        raise ValueError(f"blacklist file {path} does not exist") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc})") from None
    ids = [row[0].strip() for row in rows[1:] if row and row[0].strip()]
    bad = [i for i in ids if not i.isdigit()]
    if bad:
        raise ValueError(
            f"{path}: a CSV blacklist lists Freesound ids (integers) in its first column, below one header row; "
            f"found {bad[0]!r}"
        )
    return ids


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
    check_template(template, WAVCAPS_FIELDS, "WavCaps")
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


# ---------------------------------------------------------------------------------------------------------------------
# A user's folder


@register_reader
class FolderReader(Reader):
    """A user's captions for a folder of audio files."""

    name = "folder"
    title = "folder"

    def read(self, path: Path, options: Any) -> Catalog:
        return read_folder(path)


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


DATASETS = tuple(READERS)
"""The registered dataset names (the built-in readers; READERS also holds any registered later)."""


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


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


def check_template(template: str, fields: Sequence[str], dataset: str) -> set[str]:
    """The fields an audio file-name template uses. Refuses one that uses a field the dataset's metadata lacks
    (naming the field and the available ones) or that str.format cannot fill."""
    allowed = ", ".join("{" + f + "}" for f in fields)
    used: set[str] = set()
    try:
        for _, name, _, _ in string.Formatter().parse(template):
            if name is None:
                continue
            base = name.split(".", 1)[0].split("[", 1)[0]
            if base not in fields:
                what = f"{{{name}}}" if name else "a positional field {}"
                raise ValueError(f"uses {what}, which the {dataset} metadata does not have")
            used.add(base)
        template.format(**dict.fromkeys(fields, "0"))
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(f"audio file-name template {template!r} is invalid ({exc}); it may use {allowed}") from None
    return used


def _wavcaps_fields(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k in _WAVCAPS_KEEP or k.startswith("caption_")}


def _item_captions(item: dict[str, Any]) -> list[Any]:
    if "caption" in item:
        return item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
    return [item[c] for c in caption_columns(list(item))]


def _load_json(path: str | os.PathLike, **kwargs: Any) -> Any:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
