import csv
import json

import pytest

from shards import readers


@pytest.mark.parametrize(("split", "clips"), [("development", 3839), ("validation", 1045), ("evaluation", 1045)])
def test_real_clotho_csv_parses_completely(shared_data, split, clips):
    """Every row of the real Clotho captions CSVs becomes a clip with five captions (counts from the data README)."""
    catalog = readers.read_clotho(shared_data / f"clotho/clotho_captions_{split}.csv")
    assert (len(catalog.clips), catalog.skipped) == (clips, [])
    assert all(len(c.captions) == 5 and c.source == c.audio_path for c in catalog.clips)


@pytest.mark.parametrize(
    ("path", "rows", "per_clip"),
    [("v1/train.csv", 49838, 1), ("v1/val.csv", 2475, 5), ("v1/test.csv", 4875, 5), ("v2/test.csv", 4875, 5)],
)
def test_real_audiocaps_csv_parses_completely(shared_data, path, rows, per_clip):
    """Every AudioCaps caption row lands in its (youtube_id, start_time) clip, checked against a csv.DictReader count."""
    file = shared_data / "audiocaps" / path
    with file.open(encoding="utf-8", newline="") as fh:
        reference: dict[str, list[str]] = {}
        for r in csv.DictReader(fh):
            reference.setdefault(f"{r['youtube_id']}_{r['start_time']}.wav", []).append(r["caption"])
    catalog = readers.read_audiocaps(file)
    assert catalog.skipped == []
    assert sum(len(c.captions) for c in catalog.clips) == rows
    assert len(catalog.clips) == rows // per_clip == len(reference)
    assert {c.source: list(c.captions) for c in catalog.clips} == reference


def test_audiocaps_file_name_template(shared_data):
    """The audio file name follows --audio-template; a template with unknown fields is refused up front."""
    catalog = readers.read_audiocaps(shared_data / "audiocaps/v1/test.csv", "Y{youtube_id}.flac")
    assert catalog.clips[0].source.startswith("Y") and catalog.clips[0].source.endswith(".flac")
    with pytest.raises(ValueError, match="template .* may use"):
        readers.read_audiocaps(shared_data / "audiocaps/v1/test.csv", "{ytid}.wav")


def test_real_wavcaps_soundbible_parses_completely(shared_data):
    """All 1232 SoundBible items become clips with their one caption; sources carry the subset so ids stay distinct."""
    path = shared_data / "wavcaps/sb_final.json"
    items = json.loads(path.read_text())["data"]
    catalog = readers.read_wavcaps(path)
    assert (len(catalog.clips), catalog.skipped, catalog.excluded) == (1232, [], [])
    assert [c.captions for c in catalog.clips] == [(i["caption"],) for i in items]
    assert catalog.clips[0].source == f"soundbible/{items[0]['id']}.flac"
    assert catalog.clips[0].audio_path == f"{items[0]['id']}.flac"
    assert readers.wavcaps_subset(path) == "soundbible"


def test_wavcaps_blacklist_keeps_test_clips_out(shared_data):
    """The real blacklist removes every Clotho validation/evaluation clip from a FreeSound subset (Clotho's audio comes
    from FreeSound and its WavCaps-layout JSON carries the FreeSound ids), and only the listed ones from development."""
    blacklist = shared_data / "wavcaps/blacklist_exclude_test_ac.json"
    listed = set(json.loads(blacklist.read_text())["FreeSound"])
    for split in ("train", "val", "test"):
        path = shared_data / f"clotho/wavcaps_json/{split}.json"
        ids = [str(i["id"]) for i in json.loads(path.read_text())["data"]]
        catalog = readers.read_wavcaps(path, "freesound", [blacklist])
        assert len(catalog.excluded) == sum(i in listed for i in ids)
        assert {c.source for c in catalog.clips}.isdisjoint(f"freesound/{i}.flac" for i in listed)
        # Real quirk: two development clips share FreeSound id 130597; the second is skipped as a duplicate.
        assert all("duplicate of" in s.reason for s in catalog.skipped)
        assert len(catalog.clips) + len(catalog.excluded) + len(catalog.skipped) == len(ids)
        assert all(e.reason == "blacklisted (blacklist_exclude_test_ac.json)" for e in catalog.excluded)
        if split != "train":
            assert catalog.clips == []


def test_wavcaps_audioset_ids(tmp_path):
    """AudioSet_SL ids (`Y<ytid>.wav`) map to `Y<ytid>.flac` and are matched against the AudioSet blacklist."""
    path = tmp_path / "as_final.json"
    path.write_text(json.dumps({"data": [{"id": "Yabc.wav", "caption": "a dog"}, {"id": "Ydef.wav", "caption": "x"}]}))
    blacklist = tmp_path / "bl.json"
    blacklist.write_text(json.dumps({"AudioSet": ["Ydef.wav"], "FreeSound": ["Yabc.wav"]}))
    catalog = readers.read_wavcaps(path, blacklists=[blacklist])
    assert [(c.source, c.audio_path) for c in catalog.clips] == [("audioset_sl/Yabc.flac", "Yabc.flac")]
    assert [e.source for e in catalog.excluded] == ["audioset_sl/Ydef.flac"]


def test_bad_rows_skip_their_clip_only(tmp_path):
    """Wrong field counts, empty and non-UTF-8 captions, duplicates and id-less items skip one clip each, with reasons."""
    clotho = tmp_path / "clotho.csv"
    clotho.write_bytes(
        b"file_name,caption_1,caption_2\na.wav,x,y\nb.wav,x\nc.wav,x,\nd.wav,\xff\xfe,y\na.wav,p,q\ne.wav,ok,ok\n"
    )
    catalog = readers.read_clotho(clotho)
    assert [c.source for c in catalog.clips] == ["a.wav", "e.wav"]
    assert [(s.source, s.reason) for s in catalog.skipped] == [
        ("clotho.csv:3", "clotho.csv:3: 2 fields, the header has 3"),
        ("c.wav", "clotho.csv:4: caption 2 is empty"),
        ("d.wav", "clotho.csv:5: caption 1 is not valid UTF-8"),
        ("a.wav", "clotho.csv:6: duplicate of clotho.csv:2"),
    ]
    assert catalog.total == 6

    audiocaps = tmp_path / "ac.csv"
    audiocaps.write_text(
        "audiocap_id,youtube_id,start_time,caption\n1,aaa,0,one\n2,aaa,0,\n3,bbb,10,two\n4,,5,three\n5,ccc,1\n"
    )
    catalog = readers.read_audiocaps(audiocaps)
    assert [c.source for c in catalog.clips] == ["bbb_10.wav"]
    assert sorted(s.reason for s in catalog.skipped) == [
        "ac.csv:2: caption 2 is empty",
        "ac.csv:6: 3 fields, the header has 4",
        "youtube_id or start_time is empty or not valid UTF-8",
    ]

    wavcaps = tmp_path / "fsd_final.json"
    wavcaps.write_text(
        json.dumps({"data": [{"caption": "no id"}, {"id": 7, "caption": ""}, {"id": 8, "caption": "k"}]})
    )
    catalog = readers.read_wavcaps(wavcaps)
    assert [c.source for c in catalog.clips] == ["freesound/8.flac"]
    assert [s.reason for s in catalog.skipped] == ["item has no id", "fsd_final.json: data[1]: caption 1 is empty"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("ac.csv", "id,youtube_id,caption\n1,a,b\n", r"ac\.csv:1: header lacks column\(s\) audiocap_id, start_time"),
        ("fsd_final.json", '{"data": [\n{"id": 1,\n"caption": "x",,}]}', r"fsd_final\.json:3: not valid JSON"),
        ("fsd_final.json", '{"items": []}', r"fsd_final\.json: a WavCaps JSON file is an object with a 'data' list"),
        ("sb_final.json", b'{"data": [\n{"id": "\xff"}]}', r"sb_final\.json:2: not valid UTF-8"),
    ],
)
def test_unparseable_metadata_fails_at_once(tmp_path, name, content, match):
    """A metadata file that cannot be parsed fails with its name and line (no clip is produced)."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    dataset = "audiocaps" if name.endswith(".csv") else "wavcaps"
    with pytest.raises(ValueError, match=match):
        readers.read_catalog(dataset, path)


def test_folder_reader_layouts(tmp_path):
    """Folder captions as long CSV, wide CSV, a JSON mapping or a JSON list give the same clips."""
    expected = {"a.wav": ("dog barks", "a dog"), "sub/b.flac": ("rain",)}
    files = {
        "long.csv": "file_name,caption\na.wav,dog barks\nsub/b.flac,rain\na.wav,a dog\n",
        "wide.csv": "file_name,caption_1,caption_2\na.wav,dog barks,a dog\n",
        "map.json": json.dumps({"a.wav": ["dog barks", "a dog"], "sub/b.flac": "rain"}),
        "list.json": json.dumps(
            {
                "data": [
                    {"file_name": "a.wav", "captions": ["dog barks", "a dog"]},
                    {"file_name": "sub/b.flac", "caption": "rain"},
                ]
            }
        ),
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        catalog = readers.read_catalog("folder", tmp_path / name)
        got = {c.source: c.captions for c in catalog.clips}
        want = {k: v for k, v in expected.items() if name != "wide.csv" or k == "a.wav"}
        assert got == want, name
    with pytest.raises(ValueError, match="no caption column"):
        (tmp_path / "bad.csv").write_text("file_name,text\na.wav,x\n")
        readers.read_catalog("folder", tmp_path / "bad.csv")


def test_read_catalog_refuses_bad_arguments(tmp_path):
    """Unknown datasets, missing files and blacklists outside WavCaps are refused with what to do."""
    with pytest.raises(ValueError, match="does not exist"):
        readers.read_catalog("clotho", tmp_path / "missing.csv")
    (tmp_path / "x.csv").write_text("file_name,caption_1\na.wav,x\n")
    with pytest.raises(ValueError, match="unknown dataset"):
        readers.read_catalog("esc50", tmp_path / "x.csv")
    with pytest.raises(ValueError, match="applies to WavCaps only"):
        readers.read_catalog("clotho", tmp_path / "x.csv", blacklists=[tmp_path / "bl.json"])
    with pytest.raises(ValueError, match="pass --wavcaps-subset"):
        readers.wavcaps_subset("mystery.json")
