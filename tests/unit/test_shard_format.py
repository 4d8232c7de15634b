import io
import json
import os

import numpy as np
import pytest
import webdataset as wds

from relret import shard_format as sf
from relret import storage


def _sample(clip="a dog barks.wav", n_captions=2, seconds=1.5, seed=0):
    rng = np.random.default_rng(seed)
    audio = (0.3 * rng.standard_normal(int(seconds * sf.SAMPLE_RATE_HZ))).astype(np.float32)
    meta = sf.SampleMeta(
        captions=[f"caption {i} of {clip}" for i in range(n_captions)],
        clip_id=sf.stable_clip_id("clotho", clip),
        dataset="clotho",
        split="development",
        source_file=clip,
        duration_s=seconds,
    )
    sbert = rng.standard_normal((n_captions, 8)).astype(np.float32)
    return audio, meta, sbert


def test_clip_ids_are_stable_and_distinct():
    """Ids depend only on dataset and source name (hard-coded values guard against accidental change)."""
    assert sf.stable_clip_id("clotho", "a.wav") == sf.stable_clip_id("clotho", "a.wav")
    assert sf.stable_clip_id("clotho", "a.wav") != sf.stable_clip_id("audiocaps", "a.wav")
    assert 0 <= sf.stable_clip_id("x", "y") < 2**63
    assert sf.stable_clip_id("clotho", "Flipping Pages.wav") == 5695368800908075472


def test_names_refuse_dots_and_dashes():
    """Dataset/split names that would break keys or shard names are refused."""
    assert sf.shard_name("clotho", "development", 7) == "clotho-development-000007.tar"
    for bad in ("clo.tho", "clo-tho", "Clotho", ""):
        with pytest.raises(ValueError, match="must match"):
            sf.shard_name(bad, "train", 0)


def test_tar_round_trip(tmp_path):
    """A sample written with TarWriter reads back through WebDataset: audio within 16-bit error, meta and float16 SBERT."""
    audio, meta, sbert = _sample()
    path = tmp_path / sf.shard_name("clotho", "development", 0)
    with wds.TarWriter(str(path)) as sink:
        sink.write(sf.encode_sample(meta, sf.encode_flac(audio), sbert))
    raws = list(wds.WebDataset(str(path), shardshuffle=False))
    assert len(raws) == 1
    sample = sf.decode_sample(raws[0])
    assert sample.key == f"clotho-{meta.clip_id}"
    assert sample.meta == meta
    np.testing.assert_allclose(sample.audio, np.clip(audio, -1, 1), atol=1 / 32767 + 1e-6)  # encoder clips to [-1, 1]
    assert sample.sbert.dtype == np.float16
    np.testing.assert_array_equal(sample.sbert, sbert.astype(np.float16))


def test_decode_refuses_inconsistent_samples():
    """Missing members and a caption/embedding count mismatch are refused naming the key."""
    audio, meta, sbert = _sample()
    raw = sf.encode_sample(meta, sf.encode_flac(audio), sbert)
    with pytest.raises(ValueError, match="lacks member"):
        sf.decode_sample({k: v for k, v in raw.items() if k != "sbert.npy"})
    raw["json"] = json.dumps({**json.loads(raw["json"]), "captions": ["only one"]}).encode()
    with pytest.raises(ValueError, match=r"sbert.npy is \(2, 8\) for 1 captions"):
        sf.decode_sample(raw)
    with pytest.raises(ValueError, match="non-empty caption"):
        sf.SampleMeta([" "], 1, "clotho", "x", "f.wav", 1.0)


def test_manifest_round_trip_and_refusal():
    """The manifest serialises with totals and refuses foreign JSON."""
    m = sf.Manifest(
        "clotho",
        "development",
        "all-MiniLM-L6-v2",
        384,
        [sf.ShardInfo("a.tar", 3, 100, "x"), sf.ShardInfo("b.tar", 2, 50, "y")],
        [sf.SkippedInput("bad.wav", "truncated")],
        {"samples_per_shard": 3},
    )
    back = sf.Manifest.from_json(m.to_json())
    assert back == m and back.total_samples == 5 and back.total_bytes == 150
    with pytest.raises(ValueError, match="not a relret shard manifest"):
        sf.Manifest.from_json('{"format_version": 1}')


def test_s3_storage_and_webdataset_streaming(s3_bucket, tmp_path):
    """Shards uploaded to a real S3 API stream back through webdataset; listing and atomic writes work on S3."""
    storage.register_webdataset_s3()
    audio, meta, sbert = _sample()
    local = tmp_path / "x.tar"
    with wds.TarWriter(str(local)) as sink:
        sink.write(sf.encode_sample(meta, sf.encode_flac(audio), sbert))
    url = storage.join(s3_bucket, "clotho", "development", "clotho-development-000000.tar")
    storage.upload_file(local, url)
    storage.write_bytes(storage.join(s3_bucket, "clotho", "development", "manifest.json"), b"{}")
    assert storage.list_files(storage.join(s3_bucket, "clotho", "development"), "*.tar") == [url]
    assert storage.exists(url) and not storage.exists(url + ".nope")
    assert storage.size(url) == local.stat().st_size
    samples = [sf.decode_sample(r) for r in wds.WebDataset(url, shardshuffle=False)]
    assert [s.meta for s in samples] == [meta]


def test_atomic_local_file_leaves_nothing_on_error(tmp_path):
    """An error while writing leaves neither the final name nor a temporary file behind."""
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_local_file(target) as tmp:
            open(tmp, "wb").write(b"partial")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    storage.write_bytes(target, b"done")
    assert target.read_bytes() == b"done" and len(list(tmp_path.iterdir())) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_decode_npy_equals_numpy_load_and_refuses_objects_and_short_data():
    """decode_npy (cached header parse, an array over the bytes) gives what np.load gives for the dtypes, shapes,
    orders and format versions .npy has; object arrays, cut data and non-.npy bytes are refused with a ValueError."""
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((5, 768)).astype(np.float16),
        rng.standard_normal((1, 384)).astype(np.float32),
        np.zeros((0, 384), np.float16),
        np.asfortranarray(rng.standard_normal((3, 4))),
        rng.integers(0, 9, (2, 3, 4)),
        np.array(3.5),
    ]
    for array in arrays:
        for version in ((1, 0), (2, 0), (3, 0)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
            data = buf.getvalue()
            for _ in range(2):  # the second time from the cached header
                got, want = sf.decode_npy(data), np.load(io.BytesIO(data), allow_pickle=False)
                assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
                assert got.flags.f_contiguous == want.flags.f_contiguous
            with pytest.raises(ValueError, match="bytes after its header" if array.size else "reading array header"):
                sf.decode_npy(data[:-1])
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        sf.decode_npy(buf.getvalue())
    with pytest.raises(ValueError, match="not .npy data"):
        sf.decode_npy(b"PK\x03\x04 not an npy file")
