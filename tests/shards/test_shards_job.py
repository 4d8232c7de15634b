"""The shard job end to end on a real local Ray: real Clotho/AudioCaps clips, S3 through moto, crash and resume."""

import csv
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from kit import REPO
from kit.procs import descendants, pids_mentioning, stop_pids
from scipy.signal import resample_poly

from relret import storage
from relret.shard_format import SAMPLE_RATE_HZ, decode_sample, read_manifest, stable_clip_id
from shards import job, progress

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def _build(**kwargs):
    return job.run(job.BuildConfig(progress_bar=False, **kwargs))


def _samples(out_dir: str):
    """Every sample of a shard directory, decoded, in manifest order."""
    manifest = read_manifest(out_dir)
    storage.register_webdataset_s3()
    urls = [storage.join(out_dir, s.name) for s in manifest.shards]
    return [decode_sample(raw) for raw in wds.WebDataset(urls, shardshuffle=False)]


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _band_snr_db(x: np.ndarray, reference: np.ndarray, cutoff_hz: float) -> float:
    """SNR of x against reference below cutoff_hz (where two good resamplers must agree), edges trimmed."""

    def low(v):
        spectrum = np.fft.rfft(v)
        spectrum[np.fft.rfftfreq(len(v), 1 / SAMPLE_RATE_HZ) > cutoff_hz] = 0
        return np.fft.irfft(spectrum, len(v))[200:-200]

    a, b = low(x.astype(np.float64)), low(reference)
    return float(10 * np.log10(np.sum(b**2) / np.sum((a - b) ** 2)))


def _check_real_clips(out_dir, audio_dir, captions: dict[str, list[str]], dataset, max_duration_s, sbert_model):
    """Every clip read back: key and id, captions verbatim, audio resampled and cropped right, SBERT per caption."""
    samples = _samples(out_dir)
    assert sorted(s.meta.source_file for s in samples) == sorted(captions)
    for s in samples:
        name = s.meta.source_file
        assert s.key == f"{dataset}-{stable_clip_id(dataset, name)}"
        assert s.meta.captions == captions[name]
        source, rate = sf.read(Path(audio_dir) / name, dtype="float64", always_2d=True)
        expected_len = min(round(len(source) * SAMPLE_RATE_HZ / rate), int(max_duration_s * SAMPLE_RATE_HZ))
        assert len(s.audio) == expected_len, name
        assert s.meta.duration_s == pytest.approx(expected_len / SAMPLE_RATE_HZ)
        g = gcd(SAMPLE_RATE_HZ, rate)  # independent reference: scipy's polyphase resampler on the channel mean
        reference = np.clip(resample_poly(source.mean(axis=1), SAMPLE_RATE_HZ // g, rate // g)[:expected_len], -1, 1)
        assert _band_snr_db(s.audio, reference, 0.4 * min(rate, SAMPLE_RATE_HZ)) > 50, name
        assert s.sbert.dtype == np.float16 and s.sbert.shape == (len(captions[name]), 384)
        for row, caption in zip(s.sbert, captions[name]):
            alone = sbert_model.encode([caption], normalize_embeddings=True)[0]  # each caption on its own
            np.testing.assert_allclose(row.astype(np.float32), alone, atol=1e-3)  # float16 keeps ~3 digits
    return samples


def _check_manifest_files(out_dir: str, samples_per_shard: int, total: int):
    """Shard sizes exact but the last; bytes and sha256 as recorded (recomputed here)."""
    manifest = read_manifest(out_dir)
    full, rest = divmod(total, samples_per_shard)
    assert [s.samples for s in manifest.shards] == [samples_per_shard] * full + ([rest] if rest else [])
    for i, shard in enumerate(manifest.shards):
        assert shard.name == f"{manifest.dataset}-{manifest.split}-{i:06d}.tar"
        path = Path(out_dir) / shard.name
        assert (path.stat().st_size, _sha256(path)) == (shard.bytes, shard.sha256)
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert len(members) == 3 * shard.samples
        # One 512-byte ustar header per member, with no pax extended header before it (a reader parses one header)
        assert all(m.pax_headers == {} and m.offset_data == m.offset + 512 for m in members)
        assert {(m.mtime, m.uname, m.gname) for m in members} == {(0, "relret", "relret")}
    assert manifest.total_samples == total
    return manifest


def test_test_kit_shards_carry_the_writers_tar_headers():
    """bench/loader.py and the data tests read shards written by tests/kit/shards.py: their headers must be those of
    shards/writer.py (an int mtime, since 0.0 == 0 would hide the pax headers a float brings)."""
    from kit.shards import TAR_HEADERS

    from shards.writer import TAR_MTIME, TAR_OWNER

    assert TAR_HEADERS == {"user": TAR_OWNER, "group": TAR_OWNER, "mtime": TAR_MTIME}
    assert type(TAR_HEADERS["mtime"]) is type(TAR_MTIME) is int


def test_real_clotho_clips_read_back_exactly(shared_data, tmp_path, sbert_model):
    """The 7 real Clotho clips with their real captions: cropped to 20 s, every value checked against a reference."""
    audio_dir = shared_data / "audio/clotho_evaluation"
    names = set(os.listdir(audio_dir))
    with (shared_data / "clotho/clotho_captions_evaluation.csv").open(encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh)]
    captions_csv = tmp_path / "clotho_captions_evaluation.csv"
    with captions_csv.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([rows[0]] + [r for r in rows[1:] if r[0] in names])
    captions = {r[0]: r[1:] for r in rows[1:] if r[0] in names}
    assert len(captions) == 7

    out = tmp_path / "out"
    manifest = _build(
        dataset="clotho", captions=str(captions_csv), audio_dir=str(audio_dir), out=str(out), samples_per_shard=3,
        max_duration_s=20.0, clips_per_task=2,
    )  # fmt: skip
    out_dir = str(out / "clotho" / "evaluation")
    assert (manifest.split, manifest.sbert_model, manifest.sbert_dim) == ("evaluation", "all-MiniLM-L6-v2", 384)
    assert manifest.skipped == []
    _check_manifest_files(out_dir, 3, 7)
    samples = _check_real_clips(out_dir, audio_dir, captions, "clotho", 20.0, sbert_model)
    longer = sum(sf.info(audio_dir / name).duration > 20 for name in captions)
    assert sum(len(s.audio) == 20 * SAMPLE_RATE_HZ for s in samples) == longer == 4  # cropped to 20 s


def test_real_audiocaps_clips_read_back_exactly(shared_data, tmp_path, sbert_model):
    """The 14 real AudioCaps test clips (22.05 kHz, mostly stereo) with their five real captions each."""
    audio_dir = shared_data / "audio/audiocaps_test"
    names = set(os.listdir(audio_dir))
    with (shared_data / "audiocaps/v1/test.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if f"{r['youtube_id']}_{r['start_time']}.wav" in names]
    captions: dict[str, list[str]] = {}
    for r in keep:
        captions.setdefault(f"{r['youtube_id']}_{r['start_time']}.wav", []).append(r["caption"])
    assert len(captions) == 14 and all(len(c) == 5 for c in captions.values())
    captions_csv = tmp_path / "test.csv"
    with captions_csv.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)

    out = tmp_path / "out"
    manifest = _build(
        dataset="audiocaps", captions=str(captions_csv), audio_dir=str(audio_dir), out=str(out), samples_per_shard=5,
    )  # fmt: skip
    assert manifest.split == "test"
    out_dir = str(out / "audiocaps" / "test")
    _check_manifest_files(out_dir, 5, 14)
    _check_real_clips(out_dir, audio_dir, captions, "audiocaps", 30.0, sbert_model)


@pytest.fixture(scope="module")
def synth_reference(synth_corpus, tmp_path_factory):
    """The synthetic corpus built once without interruption (7 samples per shard): (output directory, manifest)."""
    out = tmp_path_factory.mktemp("reference")
    manifest = _build(**_synth_args(synth_corpus, out))
    return str(out / "clotho" / "development"), manifest


def _synth_args(corpus: Path, out) -> dict:
    return dict(
        dataset="clotho", captions=str(corpus / "clotho_captions_development.csv"),
        audio_dir=str(corpus / "development"), out=str(out), samples_per_shard=7, clips_per_task=4, seed=3,
    )  # fmt: skip


def test_synthetic_shards_are_exact_and_a_rerun_keeps_them(synth_corpus, synth_reference, capsys):
    """120 clips give 17 shards of 7 and one of 1, each clip once; a rerun verifies them and rewrites nothing but a
    shard whose bytes changed or that was deleted (rewritten identical)."""
    out_dir, manifest = synth_reference
    _check_manifest_files(out_dir, 7, 120)
    keys = [s.key for s in _samples(out_dir)]
    assert len(keys) == len(set(keys)) == 120
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(out_dir).glob("*.tar")}
    again = _build(**_synth_args(synth_corpus, Path(out_dir).parents[1]))
    assert "18 shard(s) already done" in capsys.readouterr().out
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]
    assert {p.name: p.stat().st_mtime_ns for p in Path(out_dir).glob("*.tar")} == mtimes

    corrupt, deleted = Path(out_dir) / manifest.shards[5].name, Path(out_dir) / manifest.shards[9].name
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 tells
    corrupt.write_bytes(bytes(data))
    deleted.unlink()
    repaired = _build(**_synth_args(synth_corpus, Path(out_dir).parents[1]))
    assert "16 shard(s) already done" in capsys.readouterr().out
    assert [s.sha256 for s in repaired.shards] == [s.sha256 for s in manifest.shards]
    assert _sha256(corrupt) == manifest.shards[5].sha256 and _sha256(deleted) == manifest.shards[9].sha256
    unchanged = {n: t for n, t in mtimes.items() if n not in (corrupt.name, deleted.name)}
    assert {n: (Path(out_dir) / n).stat().st_mtime_ns for n in unchanged} == unchanged


def test_other_inputs_refuse_an_existing_output(synth_corpus, synth_reference):
    """Different settings (here the seed) into a directory holding shards fail before anything is written."""
    out_dir, _ = synth_reference
    before = sorted(os.listdir(out_dir))
    with pytest.raises(job.ResumeMismatch, match="holds shards built from other inputs or settings"):
        _build(**{**_synth_args(synth_corpus, Path(out_dir).parents[1]), "seed": 4})
    assert sorted(os.listdir(out_dir)) == before


def test_s3_audio_in_and_shards_out(synth_corpus, synth_reference, s3_bucket):
    """Audio read from and shards written to a real S3 API give the same bytes as the local run; nothing staged is
    left behind."""
    for wav in sorted((synth_corpus / "development").iterdir()):
        storage.upload_file(wav, f"{s3_bucket}/audio/{wav.name}")
    manifest = _build(**{**_synth_args(synth_corpus, f"{s3_bucket}/shards"), "audio_dir": f"{s3_bucket}/audio"})
    out_dir = f"{s3_bucket}/shards/clotho/development"
    _, reference = synth_reference
    assert [(s.name, s.samples, s.bytes, s.sha256) for s in manifest.shards] == [
        (s.name, s.samples, s.bytes, s.sha256) for s in reference.shards
    ]
    assert [storage.size(storage.join(out_dir, s.name)) for s in manifest.shards] == [s.bytes for s in manifest.shards]
    assert len({s.key for s in _samples(out_dir)}) == 120
    listed = storage.list_files(out_dir)
    assert sorted(u.rsplit("/", 1)[1] for u in listed) == sorted([s.name for s in manifest.shards] + ["manifest.json"])


def test_killed_job_resumes_with_every_clip_once(synth_corpus, synth_reference, tmp_path):
    """SIGKILL in the middle leaves only complete shards under final names; the rerun finishes with the same bytes as
    an uninterrupted run, every clip exactly once."""
    out = tmp_path / "out"
    args = _synth_args(synth_corpus, out)
    argv = [sys.executable, str(REPO / "shards/build.py"), "--no-progress-bar"]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out_dir = out / "clotho" / "development"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ray_dirs: set[str] = set()
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(list((out_dir / progress.PROGRESS_DIR).glob("*.json"))) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no shard was finished within 120 s"
            time.sleep(0.02)
        tree = descendants(proc.pid)
        ray_dirs = {_ray_temp_dir(p) for p in tree} - {None}
        assert ray_dirs, "no process of the job names its Ray temp dir"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        # The driver's Ray processes, found before the kill (its agents' command lines name no directory, and once
        # their parents die they are no longer the driver's descendants), then anything naming its temp dir.
        stop_pids([proc.pid] + tree + descendants(proc.pid))
        for d in ray_dirs:
            stop_pids(pids_mentioning(d))
            shutil.rmtree(d, ignore_errors=True)
    assert not (out_dir / "manifest.json").exists(), "the job finished before it was killed"
    finished = sorted(out_dir.glob("*.tar"))
    assert 3 <= len(finished) < 18
    for shard in finished:  # a final name only ever holds a complete shard
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) == 3 * 7, shard.name

    manifest = _build(**args)
    _, reference = synth_reference
    assert [(s.name, s.sha256) for s in manifest.shards] == [(s.name, s.sha256) for s in reference.shards]
    keys = [s.key for s in _samples(str(out_dir))]
    assert len(keys) == len(set(keys)) == 120
    assert list(out_dir.glob(".*.part")) == []


def _ray_temp_dir(pid: int) -> str | None:
    """The private Ray temp dir a process of the job names on its command line (shards/cluster.py makes these)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None
    match = re.search(r"/tmp/relret-ray-[A-Za-z0-9_]+", cmdline)
    return match.group(0) if match else None


def _corrupt_corpus(corpus: Path, root: Path, caption_problems: bool) -> Path:
    """20 good clips of the synthetic corpus plus broken inputs, in Clotho's layout under `root`."""
    audio = root / "development"
    audio.mkdir(parents=True)
    with (corpus / "clotho_captions_development.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    header, good = rows[0], rows[1:21]
    for r in good:
        shutil.copy(corpus / "development" / r[0], audio / r[0])
    donor = (corpus / "development" / good[0][0]).read_bytes()
    (audio / "truncated.wav").write_bytes(donor[: len(donor) // 2])
    (audio / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (audio / "empty.wav").write_bytes(b"")
    sf.write(audio / "silent_header.wav", np.zeros(0, np.float32), 44100, subtype="PCM_16")
    bad = [[n, *good[0][1:]] for n in ("truncated.wav", "garbage.wav", "empty.wav", "missing.wav", "silent_header.wav")]
    with (root / "clotho_captions_development.csv").open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header] + good + bad)
    if caption_problems:
        with (root / "clotho_captions_development.csv").open("ab") as fh:
            fh.write(b"empty_caption.wav,a,b,,d,e\r\n")
            fh.write(b"latin1.wav,caf\xe9,b,c,d,e\r\n")
            fh.write(b"short_row.wav,a,b\r\n")
    return root


def test_corrupt_inputs_are_skipped_and_reported(synth_corpus, tmp_path):
    """Truncated, garbage, empty, sample-less and missing audio and bad caption rows are skipped, each listed in the
    manifest with its reason; the shards hold exactly the 20 good clips."""
    root = _corrupt_corpus(synth_corpus, tmp_path / "in", caption_problems=True)
    args = dict(
        dataset="clotho", captions=str(root / "clotho_captions_development.csv"), audio_dir=str(root / "development"),
        out=str(tmp_path / "out"), samples_per_shard=6, max_skipped_fraction=0.3, max_missing_fraction=0.3,
    )  # fmt: skip
    manifest = _build(**args)
    out_dir = str(tmp_path / "out" / "clotho" / "development")
    _check_manifest_files(out_dir, 6, 20)
    reasons = {s.source: s.reason for s in manifest.skipped}
    audio = root / "development"
    assert reasons == {
        "truncated.wav": f"audio file is truncated (data chunk has {len(_body(audio))} of {_declared(audio)} bytes): "
        f"{audio}/truncated.wav",
        "garbage.wav": f"audio file unreadable (Format not recognised.): {audio}/garbage.wav",
        "empty.wav": f"audio file is empty (0 bytes): {audio}/empty.wav",
        "missing.wav": f"audio file not found: {audio}/missing.wav",
        "silent_header.wav": f"audio file holds no samples: {audio}/silent_header.wav",
        "empty_caption.wav": "clotho_captions_development.csv:27: caption 3 is empty",
        "latin1.wav": "clotho_captions_development.csv:28: caption 1 is not valid UTF-8",
        "clotho_captions_development.csv:29": "clotho_captions_development.csv:29: 3 fields, the header has 6",
    }
    assert manifest.config["skipped_bad_input"] == 8 and manifest.config["clips_total"] == 28
    assert manifest.config["missing_audio"] == ["missing.wav"] and manifest.config["skipped_missing_audio"] == 1
    assert len({s.key for s in _samples(out_dir)}) == 20


def _body(audio: Path) -> bytes:
    data = (audio / "truncated.wav").read_bytes()
    return data[data.index(b"data") + 8 :]


def _declared(audio: Path) -> int:
    data = (audio / "truncated.wav").read_bytes()
    return int.from_bytes(data[data.index(b"data") + 4 : data.index(b"data") + 8], "little")


def test_too_many_skipped_fails_and_leaves_nothing_partial(synth_corpus, tmp_path):
    """Above --max-skipped-fraction the job fails naming the count and reasons: at once for bad metadata, during the
    run for bad audio; no manifest, and no partial file, is left."""
    root = _corrupt_corpus(synth_corpus, tmp_path / "in", caption_problems=True)
    args = dict(
        dataset="clotho", captions=str(root / "clotho_captions_development.csv"), audio_dir=str(root / "development"),
        out=str(tmp_path / "out"), samples_per_shard=4,
    )  # fmt: skip
    with pytest.raises(job.SkippedTooMany, match=r"3 of 28 clips skipped as bad input \(10\.7%\), more than"):
        _build(**args)  # the metadata alone is over the limit: fails before Ray starts
    assert not (tmp_path / "out").exists()

    root = _corrupt_corpus(synth_corpus, tmp_path / "in2", caption_problems=False)
    args["captions"], args["audio_dir"] = str(root / "clotho_captions_development.csv"), str(root / "development")
    with pytest.raises(job.SkippedTooMany, match=r"(?s)of 25 clips skipped.*audio file not found.*--max-skipped-frac"):
        _build(**{**args, "max_skipped_fraction": 0.1})
    out_dir = tmp_path / "out" / "clotho" / "development"
    assert not (out_dir / "manifest.json").exists()
    assert list(out_dir.glob(".*.part")) == []
    recorded = {r.shard.name: r.shard for r in progress.read_records(str(out_dir))}
    for shard in out_dir.glob("*.tar"):  # whatever was finished before the failure is complete and recorded
        assert progress.verify_shard(str(out_dir), recorded[shard.name].__dict__)


def test_cli_reports_user_errors(tmp_path, capsys):
    """Bad arguments and unparseable metadata end with exit code 1 and a message naming the problem."""
    base = ["--dataset", "clotho", "--audio-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    assert job.main([*base, "--captions", str(tmp_path / "nope.csv")]) == 1
    assert "captions file" in capsys.readouterr().err
    bad = tmp_path / "clotho_captions_x.csv"
    bad.write_text('file_name,caption_1\na.wav,"open\n')
    assert job.main([*base, "--captions", str(bad)]) == 1
    assert "clotho_captions_x.csv:2: not a readable CSV file" in capsys.readouterr().err
    assert job.main([*base, "--captions", str(bad), "--samples-per-shard", "0"]) == 1
    assert "--samples-per-shard must be at least 1" in capsys.readouterr().err
