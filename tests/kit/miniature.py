"""A miniature copy of Clotho, AudioCaps and WavCaps laid out exactly as a user gets them, for the rehearsal of
configs/pipeline.yaml (tests/integration/test_rehearsal.py):

    data/clotho/clotho_captions_{development,validation,evaluation}.csv     the official CSVs (rows kept as they are)
    data/clotho/{development,validation,evaluation}/{file_name}              Clotho's file names (spaces and all)
    data/audiocaps/{train,val,test}.csv                                      AudioCaps 1.0's CSVs (CRLF), whole clips
    data/audiocaps/audio/{split}/Y{youtube_id}.wav                           as WavCaps'/PANNs' download scripts name them
    data/wavcaps/json_files/{FreeSound/fsd,BBC_Sound_Effects/bbc,SoundBible/sb,AudioSet_SL/as}_final.json
    data/wavcaps/unpacked/mnt/fast/.../waveforms/{Subset}_flac/{id}.flac    where the official zips unpack
    data/wavcaps/dcase2024_task6_excluded_freesound_ids.csv                  the DCASE 2024 task 6 exclusion list format

The metadata rows are real (../shared/data): Clotho's and AudioCaps' own rows, and WavCaps' own SoundBible items. The
other three WavCaps subsets' JSON files are not in ../shared/data; they are written in WavCaps' documented schema
(see ../shared/data/README.md) from real rows: FreeSound items from Clotho's Freesound clips (their ids are Freesound
ids, which is why the DCASE exclusion list exists), BBC and AudioSet_SL items from AudioCaps training captions (ids of
AudioSet_SL as `Y<ytid>.wav`). The audio is short stand-in noise, not the clips; about 3% of the AudioCaps files are
missing (YouTube clips that are gone, also one test clip) and one AudioCaps training file is corrupt.

    python tests/kit/miniature.py DIR      # lays out DIR/data
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

UNPACKED = "mnt/fast/nobackup/scratch4weeks/xm00178/WavCaps/data/waveforms"
"""Where WavCaps' zip archives put their {Subset}_flac folders (the dataset's own scripts read them from there)."""

CLOTHO_CLIPS = {"development": 40, "validation": 12, "evaluation": 12}
"""Clotho development has 40 clips: two training shards of 32 for the pipeline's 2 local readers."""
AUDIOCAPS_CLIPS = {"train": 100, "val": 12, "test": 24}
"""AudioCaps train has 100 clips, so that its one corrupt file stays within the shard job's 1% limit."""
AUDIOCAPS_MISSING = {"train": 3, "val": 0, "test": 1}
"""Clips whose audio is gone: 4 of 136 (2.9%), within AudioCaps' 5% limit for missing audio in every split."""
WAVCAPS_ITEMS = {"freesound": 12, "bbc": 8, "soundbible": 8, "audioset_sl": 8}
WAVCAPS_EXCLUDED = 2
"""FreeSound items listed in the exclusion CSV."""
DURATION_S = 2.0


@dataclasses.dataclass
class Miniature:
    """What was laid out, for the rehearsal's checks."""

    root: Path
    clotho: dict[str, int] = dataclasses.field(default_factory=dict)
    """Clips per Clotho split."""
    audiocaps: dict[str, int] = dataclasses.field(default_factory=dict)
    """Clips listed per AudioCaps split (metadata), including the missing and the corrupt."""
    audiocaps_missing: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """The missing files' names per split."""
    audiocaps_corrupt: list[str] = dataclasses.field(default_factory=list)
    wavcaps: dict[str, int] = dataclasses.field(default_factory=dict)
    """Items per WavCaps subset in its JSON file, including the excluded."""
    wavcaps_excluded: list[str] = dataclasses.field(default_factory=list)


def _noise(rng: np.random.Generator, rate: int, seconds: float = DURATION_S) -> np.ndarray:
    return (0.1 * rng.standard_normal(int(rate * seconds))).astype(np.float32)


def _write_audio(path: Path, rng: np.random.Generator, rate: int, subtype: str = "PCM_16") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _noise(rng, rate), rate, subtype=subtype)


def _clotho(shared: Path, data: Path, rng: np.random.Generator, mini: Miniature) -> None:
    for split, n in CLOTHO_CLIPS.items():
        lines = (shared / "clotho" / f"clotho_captions_{split}.csv").read_text(encoding="utf-8").splitlines(True)
        rows = list(csv.DictReader(io.StringIO("".join(lines))))[:n]
        out = data / "clotho" / f"clotho_captions_{split}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        for row in rows:  # Clotho's clips are 44.1 kHz WAV
            _write_audio(data / "clotho" / split / row["file_name"], rng, 44100)
        mini.clotho[split] = len(rows)


def _audiocaps_clips(path: Path) -> list[list[dict]]:
    """The CSV's rows grouped into clips by (youtube_id, start_time), in order."""
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    clips: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        clips.setdefault((row["youtube_id"], row["start_time"]), []).append(row)
    return list(clips.values())


def _audiocaps(shared: Path, data: Path, rng: np.random.Generator, mini: Miniature) -> list[dict]:
    spare: list[dict] = []
    for split, n in AUDIOCAPS_CLIPS.items():
        clips = _audiocaps_clips(shared / "audiocaps" / "v1" / f"{split}.csv")
        kept, rest = clips[:n], clips[n:]
        if split == "train":
            spare = [c[0] for c in rest[:100]]
        out = data / "audiocaps" / f"{split}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8", newline="") as fh:  # AudioCaps' CSVs have CRLF line ends
            writer = csv.DictWriter(fh, fieldnames=["audiocap_id", "youtube_id", "start_time", "caption"])
            writer.writeheader()
            writer.writerows(row for clip in kept for row in clip)
        names = [f"Y{clip[0]['youtube_id']}.wav" for clip in kept]
        # Spread the missing ones over the split; the corrupt one is a training file cut to a few bytes of header.
        missing = set(names[5 :: max(1, len(names) // max(1, AUDIOCAPS_MISSING[split]))][: AUDIOCAPS_MISSING[split]])
        corrupt = names[1] if split == "train" else None
        for name in names:
            path = data / "audiocaps" / "audio" / split / name
            if name in missing:
                continue
            if name == corrupt:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 7)
                continue
            _write_audio(path, rng, 32000)  # the download scripts write 32 kHz
        mini.audiocaps[split] = len(names)
        mini.audiocaps_missing[split] = sorted(missing)
        if corrupt:
            mini.audiocaps_corrupt.append(corrupt)
    return spare


def _wavcaps(shared: Path, data: Path, rng: np.random.Generator, mini: Miniature, audiocaps_rows: list[dict]) -> None:
    root = data / "wavcaps"
    waveforms = root / "unpacked" / UNPACKED
    clotho = json.loads((shared / "clotho" / "wavcaps_json" / "train.json").read_text(encoding="utf-8"))["data"]
    freesound = [
        {
            "id": str(item["id"]),
            "caption": item["caption_1"],
            "audio": f"wav_path/{item['id']}.flac",
            "duration": DURATION_S,
            "tags": [],
            "description": item["caption_2"],
            "href": f"https://freesound.org/s/{item['id']}/",
        }
        for item in clotho[-WAVCAPS_ITEMS["freesound"] :]
        if str(item["id"]).isdigit()
    ]
    n_bbc = WAVCAPS_ITEMS["bbc"]
    bbc = [
        {
            "id": f"{7000001 + i:08d}",
            "caption": row["caption"],
            "audio": f"wav_path/{7000001 + i:08d}.flac",
            "duration": DURATION_S,
            "category": "['Nature']",
            "description": row["caption"],
        }
        for i, row in enumerate(audiocaps_rows[:n_bbc])
    ]
    soundbible = json.loads((shared / "wavcaps" / "sb_final.json").read_text(encoding="utf-8"))["data"]
    soundbible = soundbible[: WAVCAPS_ITEMS["soundbible"]]
    audioset = [
        {
            "id": f"Y{row['youtube_id']}.wav",
            "caption": row["caption"],
            "audio": f"wav_path/Y{row['youtube_id']}.flac",
            "duration": DURATION_S,
        }
        for row in audiocaps_rows[n_bbc : n_bbc + WAVCAPS_ITEMS["audioset_sl"]]
    ]
    subsets = {
        ("FreeSound", "fsd", "FreeSound_flac"): freesound,
        ("BBC_Sound_Effects", "bbc", "BBC_Sound_Effects_flac"): bbc,
        ("SoundBible", "sb", "SoundBible_flac"): soundbible,
        ("AudioSet_SL", "as", "AudioSet_SL_flac"): audioset,
    }
    for (folder, prefix, flac_folder), items in subsets.items():
        path = root / "json_files" / folder / f"{prefix}_final.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"num_captions_per_audio": 1, "data": items}), encoding="utf-8")
        for item in items:  # WavCaps' FLAC files are 32 kHz, named by id (AudioSet_SL: without .wav)
            stem = str(item["id"]).removesuffix(".wav")
            _write_audio(waveforms / flac_folder / f"{stem}.flac", rng, 32000)
        mini.wavcaps[prefix] = len(items)
    mini.wavcaps_excluded = [item["id"] for item in freesound[:WAVCAPS_EXCLUDED]]
    (root / "dcase2024_task6_excluded_freesound_ids.csv").write_text(
        "freesound_id\n" + "".join(f"{i}\n" for i in mini.wavcaps_excluded), encoding="utf-8"
    )


def lay_out(root: Path, shared: Path, seed: int = 0) -> Miniature:
    """Write the miniature under root/data; returns what it holds."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    mini = Miniature(root)
    _clotho(shared, data, rng, mini)
    spare = _audiocaps(shared, data, rng, mini)
    _wavcaps(shared, data, rng, mini, spare)
    return mini


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python tests/kit/miniature.py DIR")
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    mini = lay_out(Path(args[0]), shared)
    print(json.dumps(dataclasses.asdict(mini), default=str, indent=2))


if __name__ == "__main__":
    main()
