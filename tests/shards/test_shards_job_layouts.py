"""The shard job on the datasets' real layouts, on a real local Ray: WavCaps audio read where its archives unpack with
a Freesound-id exclusion list, and AudioCaps clips missing from YouTube counted against their own limit."""

import csv
import json
import os
from pathlib import Path

import pytest
import soundfile as sf
from kit.shards import read_samples_with_tarfile

from relret.shard_format import SAMPLE_RATE_HZ, read_manifest
from shards import job

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_local")]

UNPACKED = "mnt/fast/nobackup/scratch4weeks/xm00178/WavCaps/data/waveforms"


def _build(**kwargs):
    return job.run(job.BuildConfig(progress_bar=False, **kwargs))


def _expected_len(path: Path, max_duration_s: float = 30.0) -> int:
    info = sf.info(path)
    return min(round(info.frames * SAMPLE_RATE_HZ / info.samplerate), int(max_duration_s * SAMPLE_RATE_HZ))


def test_wavcaps_from_unpacked_archives_with_freesound_id_exclusions(shared_data, tmp_path):
    """Clotho's evaluation clips in WavCaps' FreeSound layout: the audio is found 9 levels below --audio-dir, the clips
    a DCASE-style CSV lists are excluded, and the clips without audio are listed as missing, apart from the rest."""
    audio = shared_data / "audio/clotho_evaluation"
    items = json.loads((shared_data / "clotho/wavcaps_json/test.json").read_text())["data"]
    present = [i for i in items if (audio / os.path.basename(i["wav"])).exists()]
    absent = [i for i in items if i not in present and i["id"].isdigit()][:3]
    assert len(present) == 7
    captions = tmp_path / "clotho_test_as_fsd.json"
    captions.write_text(json.dumps({"num_captions_per_audio": 5, "data": present + absent}))
    flac_dir = tmp_path / "unzipped" / UNPACKED / "FreeSound_flac"
    flac_dir.mkdir(parents=True)
    for item in present:  # the archives hold FLAC named by Freesound id
        data, rate = sf.read(audio / os.path.basename(item["wav"]), dtype="int16")
        sf.write(flac_dir / f"{item['id']}.flac", data, rate, subtype="PCM_16")
    excluded_ids = sorted(i["id"] for i in present)[:2]
    exclusions = tmp_path / "dcase2024_task6_excluded_freesound_ids.csv"
    exclusions.write_text("freesound_id\n" + "".join(f"{i}\n" for i in excluded_ids))
    args = dict(
        dataset="wavcaps", captions=str(captions), audio_dir=str(tmp_path / "unzipped"), wavcaps_subset="freesound",
        blacklist=[str(exclusions)], samples_per_shard=2, clips_per_task=3, max_missing_fraction=0.5,
    )  # fmt: skip

    manifest = _build(**args, out=str(tmp_path / "out"))
    out_dir = str(tmp_path / "out/wavcaps/freesound")
    kept = {f"freesound/{i['id']}.flac": i for i in present if i["id"] not in excluded_ids}
    samples = read_samples_with_tarfile(out_dir)
    assert sorted(s.meta.source_file for s in samples) == sorted(kept) and len(kept) == 5
    for s in samples:
        item = kept[s.meta.source_file]
        assert s.meta.captions == [item[f"caption_{k}"] for k in range(1, 6)]
        assert len(s.audio) == _expected_len(audio / os.path.basename(item["wav"]))
    assert [sh.samples for sh in manifest.shards] == [2, 2, 1]
    missing = sorted(f"freesound/{i['id']}.flac" for i in absent)
    config = manifest.config
    assert config["audio_root"] == str(flac_dir) and sorted(config["missing_audio"]) == missing
    assert (config["skipped_missing_audio"], config["skipped_bad_input"], config["blacklisted"]) == (3, 3, 2)
    assert (config["clips_total"], config["max_missing_fraction"]) == (10, 0.5)
    reasons = {s.source: s.reason for s in manifest.skipped}
    assert reasons == {
        **{m: f"audio file not found: {flac_dir}/{m.split('/')[1]}" for m in missing},
        **{f"freesound/{i}.flac": "blacklisted (dcase2024_task6_excluded_freesound_ids.csv)" for i in excluded_ids},
    }
    assert read_manifest(out_dir).config["missing_audio"] == config["missing_audio"]


@pytest.mark.slow  # two jobs, each starting its SBERT actor: about 30 s on 2 CPUs
def test_audiocaps_missing_youtube_clips_have_their_own_limit(shared_data, tmp_path):
    """The 14 real AudioCaps test clips, named as WavCaps' download script names them (Y{youtube_id}.wav), among 26
    clips whose audio is gone: over AudioCaps' 5% the job fails naming them; with a higher limit it shards the 14 and
    lists the 26 as missing."""
    present_dir = shared_data / "audio/audiocaps_test"
    with (shared_data / "audiocaps/v1/test.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    clips: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        clips.setdefault((r["youtube_id"], r["start_time"]), []).append(r["caption"])
    have = {k for k in clips if (present_dir / f"{k[0]}_{k[1]}.wav").exists()}
    gone = [k for k in clips if k not in have][:26]
    keep = have | set(gone)
    metadata = tmp_path / "test.csv"
    with metadata.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if (r["youtube_id"], r["start_time"]) in keep)
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    for ytid, start in have:
        (audio_dir / f"Y{ytid}.wav").symlink_to(present_dir / f"{ytid}_{start}.wav")
    args = dict(
        dataset="audiocaps", captions=str(metadata), audio_dir=str(audio_dir), audio_template="Y{youtube_id}.wav"
    )

    with pytest.raises(job.SkippedTooMany) as exc:
        _build(**args, out=str(tmp_path / "strict"), clips_per_task=40)  # one task: the count is final
    message = str(exc.value)
    assert message.startswith("26 of 40 clips skipped for missing audio (65.0%), more than --max-missing-fraction 0.05")
    assert "\n  26 x audio file not found\n" in message and "bad input (" not in message
    assert message.count("\n  e.g. Y") == 5 and "check --audio-dir (and --audio-template)" in message

    manifest = _build(**args, out=str(tmp_path / "out"), max_missing_fraction=0.7, samples_per_shard=5)
    samples = read_samples_with_tarfile(str(tmp_path / "out/audiocaps/test"))
    by_name = {f"Y{ytid}.wav": (ytid, start) for ytid, start in have}
    assert sorted(s.meta.source_file for s in samples) == sorted(by_name) and len(samples) == 14
    for s in samples:
        ytid, start = by_name[s.meta.source_file]
        assert s.meta.captions == clips[(ytid, start)]
        assert len(s.audio) == _expected_len(present_dir / f"{ytid}_{start}.wav")
    assert sorted(manifest.config["missing_audio"]) == sorted(f"Y{ytid}.wav" for ytid, _ in gone)
    assert (manifest.config["skipped_missing_audio"], manifest.config["max_missing_fraction"]) == (26, 0.7)
    assert [sh.samples for sh in manifest.shards] == [5, 5, 4]
