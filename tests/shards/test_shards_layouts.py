"""The datasets' real layouts in the reader registry: AudioCaps file-name templates, WavCaps audio where its archives
unpack, Freesound-id exclusion lists, and missing audio counted apart from bad input (no Ray here)."""

import csv
import json
from pathlib import Path

import pytest

from relret import storage
from relret.shard_format import SkippedInput
from shards import job, readers

UNPACKED = "mnt/fast/nobackup/scratch4weeks/xm00178/WavCaps/data/waveforms"


def test_registry_is_the_list_of_datasets():
    """Every dataset name comes from READERS, with its own options class and missing-audio default; an unknown name
    is refused with the registered ones."""
    assert tuple(readers.READERS) == readers.DATASETS == ("clotho", "audiocaps", "wavcaps", "folder")
    options = {name: r.make_options() for name, r in readers.READERS.items()}
    assert options["audiocaps"] == readers.AudioCapsOptions("{youtube_id}_{start_time}.wav")
    assert options["wavcaps"] == readers.WavCapsOptions(None, [], "{stem}.flac")
    assert options["clotho"] == options["folder"] == readers.NoOptions()
    with pytest.raises(ValueError, match="unknown dataset 'esc50'; choose one of clotho, audiocaps, wavcaps, folder"):
        readers.get_reader("esc50")
    limits = {
        d: job.BuildConfig(dataset=d, captions="x.csv", audio_dir="a", out="o").resolved_max_missing_fraction()
        for d in readers.READERS
    }
    assert limits == {"clotho": 0.01, "audiocaps": 0.05, "wavcaps": 0.01, "folder": 0.01}
    given = job.BuildConfig(dataset="audiocaps", captions="x.csv", audio_dir="a", out="o", max_missing_fraction=0.3)
    assert given.resolved_max_missing_fraction() == 0.3


def _audiocaps_groups(path: Path) -> dict[tuple[str, str], dict]:
    """(youtube_id, start_time) -> first audiocap_id and captions, read with csv.DictReader."""
    groups: dict[tuple[str, str], dict] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            g = groups.setdefault((r["youtube_id"], r["start_time"]), {"id": r["audiocap_id"], "captions": []})
            g["captions"].append(r["caption"])
    return groups


@pytest.mark.parametrize(
    ("template", "name"),
    [
        ("{youtube_id}_{start_time}.flac", lambda ytid, start, acid: f"{ytid}_{start}.flac"),  # aac-datasets
        ("Y{youtube_id}.wav", lambda ytid, start, acid: f"Y{ytid}.wav"),  # WavCaps / PANNs download scripts
        ("{audiocap_id}.wav", lambda ytid, start, acid: f"{acid}.wav"),  # audiocaps-download
    ],
)
def test_audiocaps_templates_name_the_real_layouts(shared_data, template, name):
    """Each download tool's naming gives every real val clip its file name and its five captions."""
    path = shared_data / "audiocaps/v1/val.csv"
    expected = {name(y, s, g["id"]): tuple(g["captions"]) for (y, s), g in _audiocaps_groups(path).items()}
    catalog = readers.read_catalog("audiocaps", path, readers.AudioCapsOptions(template))
    assert catalog.skipped == [] and len(catalog.clips) == 495
    assert {c.audio_path: c.captions for c in catalog.clips} == expected
    assert all(c.source == c.audio_path for c in catalog.clips)


@pytest.mark.parametrize(
    ("dataset", "template", "match"),
    [
        ("audiocaps", "{ytid}.wav", r"uses \{ytid\}, which the AudioCaps metadata does not have.*"),
        ("audiocaps", "{}.wav", r"uses a positional field \{\}"),
        ("audiocaps", "{youtube_id:d}.wav", r"Unknown format code 'd'"),
        ("wavcaps", "{youtube_id}.flac", r"uses \{youtube_id\}, which the WavCaps metadata does not have"),
    ],
)
def test_template_field_the_metadata_lacks_is_refused_at_start(dataset, template, match):
    """A template naming a field the dataset's metadata lacks fails when the config is made, naming the field and
    the fields there are."""
    fields = "{audiocap_id}, {youtube_id}, {start_time}" if dataset == "audiocaps" else "{id}, {stem}"
    with pytest.raises(ValueError, match=match) as exc:
        job.BuildConfig(dataset=dataset, captions="x.csv", audio_dir="a", out="o", audio_template=template)
    assert str(exc.value).endswith(f"it may use {fields}")


def _unpacked(root: Path, subset_folder: str, names: list[str]) -> Path:
    """Empty stand-ins for the audio files where the official WavCaps zips put them."""
    folder = root / UNPACKED / subset_folder
    folder.mkdir(parents=True)
    for n in names:
        (folder / n).write_bytes(b"")
    return folder


def test_wavcaps_audio_found_where_the_archives_unpack(shared_data, tmp_path):
    """The real SoundBible clips' audio is found from the unpack root, any folder above SoundBible_flac, the folder
    itself, or a folder of any name holding the files; the clips' paths stay relative to that folder."""
    path = shared_data / "wavcaps/sb_final.json"
    reader, options = readers.READERS["wavcaps"], readers.WavCapsOptions()
    catalog = reader.read(path, options)
    names = [c.audio_path for c in catalog.clips[:3]]
    assert names == [f"{i['id']}.flac" for i in json.loads(path.read_text())["data"][:3]]
    folder = _unpacked(tmp_path / "root", "SoundBible_flac", names)
    _unpacked(tmp_path / "root", "FreeSound_flac", ["1.flac"])
    for audio_dir in (tmp_path / "root", tmp_path / "root/mnt/fast", tmp_path / "root" / UNPACKED, folder):
        assert reader.audio_root(str(audio_dir), path, options, catalog) == str(folder)
    plain = tmp_path / "my_soundbible"
    plain.mkdir()
    (plain / names[1]).write_bytes(b"")  # the files directly in a folder of any name: used as it is
    assert reader.audio_root(str(plain), path, options, catalog) == str(plain)


def test_wavcaps_audio_folder_missing_or_ambiguous_is_a_clear_error(shared_data, tmp_path):
    """No subset folder, or two of them, fail naming the folder looked for and the places found."""
    path = shared_data / "wavcaps/sb_final.json"
    reader, options = readers.READERS["wavcaps"], readers.WavCapsOptions()
    catalog = reader.read(path, options)
    _unpacked(tmp_path / "a", "FreeSound_flac", ["1.flac"])
    with pytest.raises(ValueError, match=r"WavCaps soundbible audio not found: neither .*\.flac .*nor a folder "
                       r"SoundBible_flac at most 12 levels below it"):  # fmt: skip
        reader.audio_root(str(tmp_path / "a"), path, options, catalog)
    _unpacked(tmp_path / "b/copy1", "SoundBible_flac", [])
    _unpacked(tmp_path / "b/copy2", "SoundBible_flac", [])
    with pytest.raises(ValueError, match=r"2 folders named SoundBible_flac below it \(.*copy1/mnt.*copy2/mnt"):
        reader.audio_root(str(tmp_path / "b"), path, options, catalog)


def test_wavcaps_audio_found_on_s3(shared_data, s3_bucket):
    """The same search works on an S3 copy of the unpacked archives (by common prefixes, not by listing files)."""
    path = shared_data / "wavcaps/sb_final.json"
    reader, options = readers.READERS["wavcaps"], readers.WavCapsOptions()
    catalog = reader.read(path, options)
    bucket, _ = storage.split_s3(s3_bucket)
    for name in (
        f"{UNPACKED}/SoundBible_flac/{catalog.clips[0].audio_path}",
        f"{UNPACKED}/BBC_Sound_Effects_flac/1.flac",
    ):
        storage.s3_client().put_object(Bucket=bucket, Key=f"wavcaps/{name}", Body=b"")
    found = reader.audio_root(f"{s3_bucket}/wavcaps", path, options, catalog)
    assert found == f"{s3_bucket}/wavcaps/{UNPACKED}/SoundBible_flac"


def _freesound_id_csv(path: Path, ids: list[str]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["freesound_id"]] + [[i] for i in ids])
    return path


def test_freesound_id_csv_excludes_freesound_clips_only(shared_data, tmp_path):
    """A DCASE-style CSV of Freesound ids (here Clotho evaluation's, from its metadata file) excludes those clips from a
    FreeSound-subset JSON, naming the CSV, and nothing from another subset."""
    with (shared_data / "clotho/clotho_metadata_evaluation.csv").open(encoding="utf-8", newline="") as fh:
        ids = [r["sound_id"] for r in csv.DictReader(fh) if r["sound_id"] != "Not found"]
    soundbible = json.loads((shared_data / "wavcaps/sb_final.json").read_text())["data"]
    excluded = _freesound_id_csv(tmp_path / "dcase2024_task6_excluded_freesound_ids.csv", ids + [soundbible[0]["id"]])
    catalog = readers.read_catalog("wavcaps", shared_data / "clotho/wavcaps_json/test.json",
                                   readers.WavCapsOptions("freesound", [str(excluded)]))  # fmt: skip
    assert {e.source for e in catalog.excluded} == {f"freesound/{i}.flac" for i in ids}
    assert {e.reason for e in catalog.excluded} == {"blacklisted (dcase2024_task6_excluded_freesound_ids.csv)"}
    # Real quirk: five clips' Freesound id is "Not found" (in the JSON and the metadata): one clip, four duplicates.
    assert [c.source for c in catalog.clips] == ["freesound/Not found.flac"]
    assert len(catalog.clips) + len(catalog.excluded) + len(catalog.skipped) == 1045 and len(catalog.skipped) == 4
    sb = readers.read_catalog("wavcaps", shared_data / "wavcaps/sb_final.json", blacklists=[excluded])
    assert (len(sb.clips), sb.excluded) == (1232, [])

    both = readers.read_blacklists([excluded, shared_data / "wavcaps/blacklist_exclude_test_ac.json"])
    json_ids = json.loads((shared_data / "wavcaps/blacklist_exclude_test_ac.json").read_text())["FreeSound"]
    assert set(both["FreeSound"]) == set(ids) | {str(soundbible[0]["id"])} | set(json_ids)
    (tmp_path / "bad.csv").write_text("freesound_id\n123\nY-abc.wav\n")
    with pytest.raises(ValueError, match=r"bad\.csv: a CSV blacklist lists Freesound ids .* found 'Y-abc\.wav'"):
        readers.read_blacklists([tmp_path / "bad.csv"])


def _skip(name: str, reason: str) -> SkippedInput:
    return SkippedInput(name, reason)


def test_missing_audio_is_counted_apart_from_bad_input():
    """Missing files count against --max-missing-fraction only, corrupt ones against --max-skipped-fraction only; the
    error gives both counts, the counts per reason and the first names."""
    missing = [_skip(f"m{i}.wav", f"audio file not found: /a/m{i}.wav") for i in range(5)]
    corrupt = [_skip("c.wav", "audio file unreadable (Format not recognised.): /a/c.wav")]
    tally = job.LeftOutTally(total=100, max_skipped_fraction=0.01, max_missing_fraction=0.05)
    tally.add(missing + corrupt)
    tally.check()  # 5 missing of 100 is the limit, not over it; 1 corrupt likewise
    assert (len(tally.missing), len(tally.bad)) == (5, 1)
    tally.add(
        [_skip("m5.wav", "audio file not found: /a/m5.wav"), _skip("e.wav", "audio file is empty (0 bytes): /a/e")]
    )
    with pytest.raises(job.SkippedTooMany) as exc:
        tally.check()
    assert str(exc.value).splitlines()[:5] == [
        "2 of 100 clips skipped as bad input (2.0%), more than --max-skipped-fraction 0.01",
        "6 of 100 clips skipped for missing audio (6.0%), more than --max-missing-fraction 0.05:",
        "  6 x audio file not found",
        "  1 x audio file unreadable",
        "  1 x audio file is empty",
    ]
    assert "  e.g. c.wav: audio file unreadable (Format not recognised.): /a/c.wav" in str(exc.value)
    assert "  e.g. m0.wav: audio file not found: /a/m0.wav" in str(exc.value)


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("clotho_captions_development.csv:27: caption 3 is empty", "caption 3 is empty"),
        ("fsd_final.json: data[1]: caption 1 is empty", "caption 1 is empty"),
        ("list.json: [3]: caption 1 is empty", "caption 1 is empty"),
        ("clotho.csv:29: 3 fields, the header has 6", "3 fields, the header has 6"),
        ("ac.csv:6: duplicate of ac.csv:2", "duplicate of ac.csv"),
        ("audio file is truncated (data chunk has 10 of 20 bytes): /x/a b.wav", "audio file is truncated"),
        ("audio file not found: s3://b/audio/x.wav", "audio file not found"),
        ("blacklisted (blacklist_exclude_test_ac.json)", "blacklisted"),
        ("item has no id", "item has no id"),
    ],
)
def test_reasons_group_by_kind(reason, kind):
    """The summary groups reasons by kind: the file, line, path and details in parentheses are dropped."""
    assert job.skip_reason_kind(reason) == kind


def test_audio_task_reasons_tell_missing_from_corrupt(tmp_path):
    """The reason an audio task gives for an absent file (relret.audio's wording) is the one counted as missing; an
    empty file is bad input."""
    (tmp_path / "empty.wav").write_bytes(b"")
    clips = [readers.ClipSpec(n, n, ("a caption",)) for n in ("absent.wav", "empty.wav")]
    statuses, encoded = job.encode_clips(clips, str(tmp_path), "clotho", "x", 30.0)
    assert encoded == [None, None]
    assert statuses == [
        f"audio file not found: {tmp_path}/absent.wav",
        f"audio file is empty (0 bytes): {tmp_path}/empty.wav",
    ]
    assert [job.is_missing_audio(SkippedInput(c.source, s)) for c, s in zip(clips, statuses)] == [True, False]
