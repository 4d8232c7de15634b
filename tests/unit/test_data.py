"""Streaming shards: splits across ranks and workers, mixing weights, captions and crops, resume, damage, errors."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import torch
from kit.shards import read_shard_with_tarfile, truncate_shard, write_shard_dir

from relret import shard_format, storage
from relret.config import ConfigError, DataConfig, ShardSource
from relret.data import (
    StreamPosition,
    TrainStream,
    ValStream,
    count_captions,
    make_loader,
    open_train_sources,
    open_val_sources,
)

SR = shard_format.SAMPLE_RATE_HZ


def _cfg(paths, **kw) -> DataConfig:
    weights = kw.pop("weights", [None] * len(paths))
    base = dict(sbert_dim=384, crop_s=2.0, num_workers=0, shuffle_buffer=1, shuffle_initial=1, prefetch_factor=2)
    base.update(kw)
    return DataConfig(train=[ShardSource(str(p), w) for p, w in zip(paths, weights)], **base)


def _epoch(cfg, rank=0, world=1, batch=4, batches=8, epoch=0, start=None, sources=None):
    sets = sources or open_train_sources(cfg, world)
    stream = TrainStream(
        sets, cfg, seed=7, epoch=epoch, rank=rank, world_size=world, batch_size=batch, batches=batches, start=start
    )
    return list(make_loader(stream, cfg))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    a = write_shard_dir(root / "a", dataset="aaa", n_clips=64, per_shard=4, durations_s=(1.0, 2.5, 4.0), seed=1)
    b = write_shard_dir(root / "b", dataset="bbb", n_clips=32, per_shard=4, seed=2)
    return root, a, b


def test_two_ranks_of_four_read_what_one_rank_of_eight_reads(corpus):
    """With shards of one micro-batch and no shuffling, rank 0 and rank 1 batches (4 each) concatenate to the
    batches of a single rank with micro-batch 8, for 1 and 2 workers: the global batch does not depend on the split."""
    root, _, _ = corpus
    for workers in (0, 2):
        cfg = _cfg([root / "a"], num_workers=workers)
        one = _epoch(cfg, batch=8, batches=6)
        ranks = [_epoch(cfg, rank=r, world=2, batch=4, batches=6) for r in (0, 1)]
        for i, batch in enumerate(one):
            both = ranks[0][i]["keys"] + ranks[1][i]["keys"]
            assert batch["keys"] == both
            assert batch["captions"] == ranks[0][i]["captions"] + ranks[1][i]["captions"]
            audio = np.concatenate([r[i]["audio"].numpy()[:, : batch["audio"].shape[1]] for r in ranks])
            np.testing.assert_array_equal(batch["audio"].numpy()[:, : audio.shape[1]], audio)


@pytest.mark.parametrize("crop_s", [2.0, 5.0])
def test_workers_reusing_shared_memory_slots_deliver_the_batches_of_fresh_blocks(corpus, monkeypatch, crop_s):
    """2 workers decoding 24 batches straight into 3 reused shared-memory slots each (relret.data.PcmSlots,
    _BlockRows), read by a slow consumer that keeps every batch: each batch equals what the same workers give
    decoding into row buffers and collating into a fresh block (PCM bytes, lengths, keys), so no slot was written
    while a kept batch still lay in it; the slots really were reused and no worker fell back to a fresh block. Clips
    of 1-4 s: cropped to 2 s most batches hold a full-length row; with 5 s crops every batch's rows are moved to
    the longest clip's length in the slot."""
    import time

    from relret.data import PcmSlots

    root, _, _ = corpus
    seen = []
    release = PcmSlots.release

    def spy(self, batch):
        seen.append(batch.slot)
        time.sleep(0.02)  # the workers run ahead and wait for slots
        return release(self, batch)

    cfg = _cfg([root / "a"], num_workers=2, shuffle_buffer=8, prefetch_factor=2, crop_s=crop_s)
    with monkeypatch.context() as fresh_blocks:
        fresh_blocks.setattr(PcmSlots, "acquire", lambda self, worker, rows, length, capacity: (None, None))
        want = _epoch(cfg, batch=8, batches=24)
    monkeypatch.setattr(PcmSlots, "release", spy)
    got = _epoch(cfg, batch=8, batches=24)
    assert len(got) == len(want) == 24
    for a, b in zip(got, want):
        assert a.slot is None and a.keys == b.keys
        assert a.pcm.dtype == torch.int16 and torch.equal(a.pcm, b.pcm) and torch.equal(a.audio_len, b.audio_len)
        assert not a.pcm.is_shared()  # copied out of the slot
    assert None not in seen and Counter(seen) == {(w, s): 4 for w in (0, 1) for s in range(3)}


@pytest.mark.parametrize(
    ("stride", "lengths"),
    [(10, [10, 3, 7]), (10, [4, 9, 9, 1]), (6, [5, 5, 5, 5, 5]), (10, [2]), (8, [8, 8])],
)
def test_block_rows_lay_out_in_place_the_batch_collate_writes(stride, lengths):
    """Rows decoded into a block at the crop's stride, then laid out at the longest row's length in place (moves
    whose source and destination overlap included), equal the batch stacked from separate rows, each zero-padded;
    a window longer than the stride is refused."""
    from relret.data import _BlockRows

    rng = np.random.default_rng(0)
    block = torch.full((len(lengths), stride), -1, dtype=torch.int16)  # -1 where no row is written
    rows = _BlockRows(block)
    want = [rng.integers(-(2**15), 2**15, n).astype(np.int16) for n in lengths]
    for i, pcm in enumerate(want):
        rows.row(i, len(pcm))[:] = pcm
    expected = np.zeros((len(lengths), max(lengths)), dtype=np.int16)
    for i, pcm in enumerate(want):
        expected[i, : len(pcm)] = pcm
    got = rows.batch(lengths)
    assert got.shape == expected.shape and got.is_contiguous() and got.data_ptr() == block.data_ptr()
    np.testing.assert_array_equal(got.numpy(), expected)
    with pytest.raises(ValueError, match=f"a window of {stride + 1} frames does not fit a row of {stride}"):
        rows.row(0, stride + 1)


def test_slots_hand_out_free_blocks_and_fall_back_when_none_comes_back(monkeypatch):
    """In one process: 2 slots are handed out, a third request waits WAIT_S and gets a fresh block (None), a
    released slot is handed out again with the same memory, grown when a batch needs more."""
    from relret.data import Batch, PcmSlots

    monkeypatch.setattr(PcmSlots, "WAIT_S", 0.05)
    slots = PcmSlots(num_workers=1, per_worker=2)
    a, slot_a = slots.acquire(0, 2, 10, capacity=20)
    b, slot_b = slots.acquire(0, 2, 10, capacity=20)
    assert {slot_a, slot_b} == {(0, 0), (0, 1)} and a.is_shared() and a.shape == (2, 10)
    fresh, none = slots.acquire(0, 2, 10, capacity=20)
    assert none is None and fresh.shape == (2, 10)
    a[:] = 7
    batch = Batch(
        pcm=a,
        audio_len=torch.tensor([10, 10]),
        captions=["x", "y"],
        caption_sbert=torch.zeros(2, 3),
        clip_sbert=torch.zeros(2, 1, 3),
        caption_mask=torch.ones(2, 1, dtype=torch.bool),
        clip_ids=torch.tensor([1, 2]),
        keys=["k1", "k2"],
        slot=slot_a,
    )
    out = slots.release(batch)
    assert out.slot is None and (out.pcm == 7).all() and out.pcm.data_ptr() != a.data_ptr()
    again, slot_again = slots.acquire(0, 1, 20, capacity=20)
    assert slot_again == slot_a and again.data_ptr() == a.data_ptr()  # the same block, reused
    out = slots.release(dataclasses_replace(batch, pcm=again, slot=slot_again))
    bigger, slot_big = slots.acquire(0, 3, 10, capacity=20)
    assert slot_big == slot_a and bigger.shape == (3, 10)  # 30 samples: a larger block for the slot


def test_a_pickled_batch_carries_its_small_tensors_inline_and_comes_back_equal(corpus):
    """What a worker sends: every field equal after a round trip through torch's pickler, the small tensors as
    numpy inside the pickle (no shared-memory block of their own), pcm as a shared-memory tensor."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 (registers torch's reductions with ForkingPickler)

    root, _, _ = corpus
    (batch,) = _epoch(_cfg([root / "a"]), batch=4, batches=1)
    batch.pcm.share_memory_()
    data = bytes(ForkingPickler.dumps(batch))
    assert data.count(b"numpy") >= 1 and len(data) > batch.clip_sbert.numel() * 4  # the vectors travel inline
    back = pickle.loads(data)
    for name in ("pcm", "audio_len", "caption_sbert", "clip_sbert", "caption_mask", "clip_ids"):
        a, b = getattr(batch, name), getattr(back, name)
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), name
    assert back.pcm.is_shared() and back.keys == batch.keys and back.info == batch.info


def test_caption_copies_share_one_parse_and_each_copy_of_a_bad_sample_fails(monkeypatch):
    """With data.epoch_unit caption, a clip's copies are parsed once (json, vectors, FLAC header), and every copy of
    a clip whose vectors do not read raises, so each is still counted as a bad sample, as before the shared parse."""
    from relret import data

    calls = []
    parse = shard_format.decode_sample_encoded
    monkeypatch.setattr(shard_format, "decode_sample_encoded", lambda raw: calls.append(raw["__key__"]) or parse(raw))
    meta = shard_format.SampleMeta(
        clip_id=1, dataset="d", split="s", source_file="a.wav", duration_s=1.0, captions=["one", "two", "three"]
    )
    good = shard_format.encode_sample(meta, shard_format.encode_flac(np.zeros(SR, np.float32)), np.ones((3, 4)))
    bad = {**good, "__key__": "bad", shard_format.SBERT_EXT: b"not an npy file"}
    copies = list(data._per_caption(iter([{**good, "__key__": "good"}, bad])))
    assert [(c["__key__"], c[data.CAPTION_INDEX]) for c in copies] == [
        (k, i) for k in ("good", "bad") for i in range(3)
    ]
    samples = [data._decode(c, 4) for c in copies[:3]]
    assert all(s is samples[0] for s in samples) and samples[0].meta.captions == ["one", "two", "three"]
    for c in copies[3:]:
        with pytest.raises(ValueError):
            data._decode(c, 4)
    assert calls == ["good", "bad"]


def test_ranks_and_workers_read_disjoint_shard_draws(corpus):
    """2 ranks x 2 workers: within an epoch no (rank, worker) repeats another's shard draw; all quotas are met."""
    root, records, _ = corpus
    shard_of = {r["key"]: r["shard"] for r in records}
    cfg = _cfg([root / "a"], num_workers=2)
    seen = []
    for rank in (0, 1):
        batches = _epoch(cfg, rank=rank, world=2, batch=4, batches=6)
        assert len(batches) == 6
        assert Counter(b["worker"] for b in batches) == {0: 3, 1: 3}
        assert [b["worker"] for b in batches] == [0, 1, 0, 1, 0, 1]  # round-robin
        seen += [(rank, b["worker"], k) for b in batches for k in b["keys"]]
    # each shard draw is 4 consecutive keys of one shard; a repeated draw of a shard (resampling) is allowed, but
    # every stream's keys come in whole shards
    for stream in {(r, w) for r, w, _ in seen}:
        keys = [k for r, w, k in seen if (r, w) == stream]
        groups = [keys[i : i + 4] for i in range(0, len(keys), 4)]
        assert all(len({shard_of[k] for k in g}) == 1 for g in groups)


@pytest.mark.parametrize("weights, want_b", [((1.0, 3.0), 0.75), ((None, None), 32 / 96)])
def test_mixing_weights_set_each_sources_share(corpus, weights, want_b):
    """Source b's share of 800 training samples is w_b / (w_a + w_b) (without weights: its share of all clips)."""
    root, _, _ = corpus
    cfg = _cfg([root / "a", root / "b"], weights=list(weights))
    keys = [k for b in _epoch(cfg, batch=16, batches=50) for k in b["keys"]]
    share_b = sum(k.startswith("bbb-") for k in keys) / len(keys)
    # 200 shard draws: the binomial standard deviation of the share is at most 0.035 (the seed is fixed)
    assert abs(share_b - want_b) < 0.08, share_b


def test_caption_choice_crop_and_vectors_match_the_shard(corpus):
    """Each row's caption is one of its clip's captions, caption_sbert is that caption's stored vector, clip_sbert
    holds all of them under the mask, and the audio is a contiguous piece of the clip no longer than crop_s."""
    root, records, _ = corpus
    reference = {}
    for shard in sorted((root / "a").glob("*.tar")):
        reference.update(read_shard_with_tarfile(shard))
    cfg = _cfg([root / "a"], crop_s=2.0, max_captions=5)
    chosen = Counter()
    for epoch in range(3):
        for batch in _epoch(cfg, batch=8, batches=4, epoch=epoch):
            for i, key in enumerate(batch["keys"]):
                ref = reference[key]
                c = ref.meta.captions.index(batch["captions"][i])
                chosen[(key, c)] += 1
                np.testing.assert_allclose(batch["caption_sbert"][i].numpy(), ref.sbert[c].astype(np.float32))
                n = len(ref.meta.captions)
                assert batch["caption_mask"][i].tolist() == [True] * n + [False] * (5 - n)
                np.testing.assert_allclose(batch["clip_sbert"][i, :n].numpy(), ref.sbert.astype(np.float32))
                length = int(batch["audio_len"][i])
                assert length == min(len(ref.audio), 2 * SR)
                piece = batch["audio"][i, :length].numpy()
                candidates = np.flatnonzero(ref.audio[: len(ref.audio) - length + 1] == piece[0])
                assert any(np.array_equal(ref.audio[s : s + length], piece) for s in candidates), key
                assert not batch["audio"][i, length:].any()
    multi = {k for k, _ in chosen if len(reference[k].meta.captions) > 1}
    assert any(len({c for k2, c in chosen if k2 == k}) > 1 for k in multi)  # captions vary across epochs


def test_resumed_stream_continues_where_the_checkpoint_was(corpus):
    """Positions taken after 5 of 10 batches (2 workers, shuffling) make a new stream yield exactly batches 6-10."""
    root, _, _ = corpus
    cfg = _cfg([root / "a"], num_workers=2, shuffle_buffer=8, shuffle_initial=4)
    full = _epoch(cfg, batch=4, batches=10)
    positions = {}
    for b in full[:5]:
        positions[b["worker"]] = StreamPosition(b["batches_done"], b["raw_pos"])
    rest = _epoch(cfg, batch=4, batches=10, start=positions)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[5:]]
    assert [b["captions"] for b in rest] == [b["captions"] for b in full[5:]]
    for a, b in zip(rest, full[5:]):
        np.testing.assert_array_equal(a["audio"].numpy(), b["audio"].numpy())


def test_shard_cut_at_a_block_boundary_counts_as_damaged(tmp_path, capfd):
    """A shard cut between samples is a valid, shorter tar: its manifest count gives it away, and it is counted."""
    write_shard_dir(tmp_path / "a", n_clips=8, per_shard=4, seed=3)
    shard = tmp_path / "a" / "synth-train-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = members[len(shard_format.MEMBERS)].offset  # the header of the second sample's first member
    shard.write_bytes(shard.read_bytes()[:cut])
    batches = _epoch(_cfg([tmp_path / "a"]), batch=4, batches=3)
    assert sum(b["damaged_shards"] for b in batches) >= 1
    assert "1 samples where the manifest lists 4" in capfd.readouterr().err


def test_a_shard_rewritten_while_its_samples_wait_in_the_shuffle_buffer_counts_them_bad(tmp_path, capfd):
    """The shuffle buffer holds where a clip lies in its shard, not its bytes: a shard rewritten after its samples
    entered the buffer is not read at the old offsets; those samples are counted bad, named in a warning, and the
    epoch still delivers every batch from the other samples."""
    write_shard_dir(tmp_path / "a", n_clips=16, per_shard=8, seed=3)
    cfg = _cfg([tmp_path / "a"], shuffle_buffer=64, shuffle_initial=64, epoch_unit="clip")
    stream = TrainStream(
        open_train_sources(cfg, 1), cfg, seed=7, epoch=0, rank=0, world_size=1, batch_size=4, batches=8
    )
    batches = iter(stream)
    first = next(batches)  # the buffer now holds 64 samples, drawn from both shards
    assert first.info.bad_samples == 0
    rewritten = tmp_path / "a" / "synth-train-000001.tar"
    rewritten.write_bytes(rewritten.read_bytes())  # same bytes, rewritten in place: offsets can no longer be trusted
    rest = list(batches)
    assert len(rest) == 7 and all(len(b) == 4 for b in rest)
    assert sum(b.info.bad_samples for b in rest) >= 1
    err = capfd.readouterr().err
    assert "undecodable sample" in err and "changed since its members were listed" in err


def test_truncated_shard_is_skipped_counted_and_training_goes_on(tmp_path, capfd):
    """A shard cut in half yields the samples before the cut, is counted as damaged with a warning, and the epoch
    still delivers every batch (the resumed position stays exact despite the damage)."""
    write_shard_dir(tmp_path / "a", n_clips=16, per_shard=8, seed=3)
    bad = tmp_path / "a" / "synth-train-000001.tar"
    before = set(read_shard_with_tarfile(bad))
    truncate_shard(bad, 0.5)
    names = []
    with tarfile.open(bad, mode="r|*") as tar:
        try:
            for member in tar:
                names.append(member.name)
        except tarfile.ReadError:
            pass
    # whole samples before the cut (the last member read may be cut itself)
    members = Counter(n.partition(".")[0] for n in names[:-1])
    kept = {k for k, n in members.items() if n == len(shard_format.MEMBERS)}
    lost = before - kept
    assert kept and lost
    cfg = _cfg([tmp_path / "a"], num_workers=2, shuffle_buffer=4, shuffle_initial=2)
    batches = _epoch(cfg, batch=4, batches=12)
    assert len(batches) == 12
    damaged = sum(b["damaged_shards"] for b in batches)
    assert damaged >= 1
    keys = {k for b in batches for k in b["keys"]}
    assert kept <= keys and not (keys & lost)  # what precedes the cut is used, nothing from behind it
    err = capfd.readouterr().err
    assert "WARNING: skipping damaged shard data" in err and bad.name in err
    positions = {}
    for b in batches[:5]:
        positions[b["worker"]] = StreamPosition(b["batches_done"], b["raw_pos"])
    rest = _epoch(cfg, batch=4, batches=12, start=positions)
    assert [b["keys"] for b in rest] == [b["keys"] for b in batches[5:]]


def _read_shard(read, url):
    """(samples, damage flagged) of one shard through `read(url, handler)`, members read on demand (TarMember)
    read out."""
    from relret.data import DamageCounter
    from relret.tar_member import TarMember

    damage = DamageCounter("test")
    damage.url = url
    samples = [
        {k: v.read() if isinstance(v, TarMember) else v for k, v in raw.items() if k != "__local_path__"}
        for raw in read(url, damage)
    ]
    return samples, damage.flagged


def test_local_shards_read_with_random_access_give_webdatasets_samples(tmp_path, capfd):
    """Local shards are read member by member with random access (relret.data._shard_samples) instead of through
    webdataset's stream reader: the same samples, keys and bytes, for an intact shard and for shards cut at several
    points. Both flag a cut inside a member's data; a cut inside a header or between samples ends the tar as if
    cleanly in both, and the manifest count reveals it (test_shard_cut_at_a_block_boundary_counts_as_damaged). The
    clips come as TarMembers, read on demand, never as bytes."""
    import webdataset as wds

    from relret.data import DamageCounter, _shard_samples
    from relret.tar_member import TarMember

    def streamed(url, handler):
        return wds.tarfile_to_samples(handler=handler)([{"url": url}])

    write_shard_dir(tmp_path / "a", n_clips=6, per_shard=6, durations_s=(1.0, 2.5), seed=5)
    shard = tmp_path / "a" / "synth-train-000000.tar"
    data = shard.read_bytes()
    intact, flagged = _read_shard(_shard_samples, str(shard))
    assert (intact, flagged) == _read_shard(streamed, str(shard))
    assert not flagged and len(intact) == 6 and all(set(shard_format.MEMBERS) <= set(s) for s in intact)
    damage = DamageCounter("test")
    assert all(isinstance(raw[shard_format.AUDIO_EXT], TarMember) for raw in _shard_samples(str(shard), damage))
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    per_sample = len(shard_format.MEMBERS)
    assert members[2 * per_sample].name.endswith(".flac") and not members[2 * per_sample + 1].name.endswith(".flac")
    cuts = {  # where: (cut, samples read (the last one may lack members), flagged)
        "in a header": (members[per_sample + 1].offset + 100, 2, False),
        "in member data": (members[2 * per_sample + 1].offset_data + members[2 * per_sample + 1].size // 2, 3, True),
        "in a clip's data": (members[2 * per_sample].offset_data + members[2 * per_sample].size // 2, 2, True),
        "between samples": (members[2 * per_sample].offset, 2, False),
        "in the end blocks": (len(data) - 700, 6, False),
    }
    for where, (cut, n_samples, flagged) in cuts.items():
        cut_shard = tmp_path / f"cut-{where.replace(' ', '-')}.tar"
        cut_shard.write_bytes(data[:cut])
        local = _read_shard(_shard_samples, str(cut_shard))
        assert local == _read_shard(streamed, str(cut_shard)), where
        assert (len(local[0]), local[1]) == (n_samples, flagged), where
    capfd.readouterr()


def test_validation_reads_every_clip_once_with_all_captions(corpus):
    """2 ranks x 2 workers together see each validation clip once, with all of its captions, cut to val_crop_s."""
    root, records, _ = corpus
    cfg = DataConfig(val=[str(root / "a")], sbert_dim=384, num_workers=2, val_batch_size=5, val_crop_s=1.5)
    sets = open_val_sources(cfg)
    seen = {}
    for rank in (0, 1):
        for batch in make_loader(ValStream(sets, cfg, rank, 2), cfg):
            for key, caps, n in zip(batch["keys"], batch["all_captions"], batch["audio_len"].tolist()):
                assert key not in seen
                seen[key] = (caps, n)
    assert set(seen) == {r["key"] for r in records}
    for r in records:
        assert seen[r["key"]] == (r["captions"], min(int(r["duration_s"] * SR), int(1.5 * SR)))


def test_errors_name_the_problem(tmp_path, corpus):
    """No shards, too few shards for the readers, an SBERT dimension that differs, a missing shard: clear errors."""
    root, _, _ = corpus
    with pytest.raises(ValueError, match="no manifest.json"):
        open_train_sources(_cfg([tmp_path / "nothing"]), 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text((root / "a" / "manifest.json").read_text())
    with pytest.raises(ValueError, match=r"no shard matches .*empty/\*\.tar"):
        open_train_sources(_cfg([tmp_path / "empty"]), 1)
    with pytest.raises(ValueError, match=r"16 training shard\(s\) for 4 rank\(s\) x 5 worker\(s\) = 20 readers"):
        open_train_sources(_cfg([root / "a"], num_workers=5), 4)
    with pytest.raises(ValueError, match="data.sbert_dim=768 but the shards in .* hold 384-dimensional"):
        open_train_sources(_cfg([root / "a"], sbert_dim=768), 1)
    write_shard_dir(tmp_path / "gap", n_clips=8, per_shard=4)
    (tmp_path / "gap" / "synth-train-000001.tar").unlink()
    with pytest.raises(ValueError, match="1 shard.* missing .*synth-train-000001.tar"):
        open_train_sources(_cfg([tmp_path / "gap"]), 1)
    with pytest.raises(ConfigError, match="data.train is empty"):
        open_train_sources(DataConfig(), 1)
    with pytest.raises(ConfigError, match=r"data.train\[\].weight must be > 0"):
        ShardSource("x", 0.0)


def test_streams_from_s3(s3_bucket, corpus):
    """The same shards uploaded to S3 stream the same batches as from local disk (2 workers)."""
    root, _, _ = corpus
    prefix = f"{s3_bucket}/shards/a"
    for f in sorted((root / "a").iterdir()):
        storage.upload_file(f, f"{prefix}/{f.name}")
    local = _epoch(_cfg([root / "a"], num_workers=2), batch=4, batches=4)
    remote = _epoch(_cfg([prefix], num_workers=2), batch=4, batches=4)
    assert [b["keys"] for b in remote] == [b["keys"] for b in local]
    np.testing.assert_array_equal(remote[-1]["audio"].numpy(), local[-1]["audio"].numpy())


def test_manifest_written_by_the_kit_is_readable(corpus):
    """The test kit writes the real format: manifest counts and shard sha256 match the files."""
    root, records, _ = corpus
    manifest = shard_format.read_manifest(str(root / "a"))
    assert manifest.total_samples == len(records) == 64
    first = manifest.shards[0]
    assert shard_format.sha256_of(str(root / "a" / first.name)) == first.sha256
    assert json.loads(io.BytesIO((root / "a" / "manifest.json").read_bytes()).read())["sbert_dim"] == 384


# ---------------------------------------------------------------------------------------------------------------------
# data.epoch_unit: caption (the authors' epoch: every caption once)


def test_caption_epoch_counts_captions_and_serves_each_caption_of_a_drawn_clip_once(corpus, capsys):
    """With epoch_unit caption a source's epoch is its caption total (counted in the shards), and a shard draw gives
    every caption of each of its clips exactly once, as its own sample with that caption's vector; the crops of one
    clip's captions are drawn apart."""
    root, records, _ = corpus
    cfg = _cfg([root / "a"], epoch_unit="caption", crop_s=2.0)
    sets = open_train_sources(cfg, 1)
    assert sets[0].total_samples == sum(len(r["captions"]) for r in records) == 160
    assert sets[0].samples == [4] * 16  # the clips per shard stay what the manifest lists
    assert "160 captions of 64 clips" in capsys.readouterr().out
    reference = {}
    for shard in sorted((root / "a").glob("*.tar")):
        reference.update(read_shard_with_tarfile(shard))
    by_shard = {}
    for r in records:
        by_shard.setdefault(r["shard"], []).extend((r["key"], c) for c in r["captions"])
    # no shuffling and 10 samples per batch: each batch is one shard draw (4 clips with 1 + 2 + 3 + 4 captions)
    crops = {}
    for batch in _epoch(cfg, batch=10, batches=6, sources=sets):
        pairs = list(zip(batch["keys"], batch["captions"]))
        shard = {r["shard"] for r in records if r["key"] == pairs[0][0]}.pop()
        assert sorted(pairs) == sorted(by_shard[shard])
        for i, (key, caption) in enumerate(pairs):
            ref = reference[key]
            c = ref.meta.captions.index(caption)
            np.testing.assert_allclose(batch["caption_sbert"][i].numpy(), ref.sbert[c].astype(np.float32))
            length = int(batch["audio_len"][i])
            crops.setdefault(key, set()).add(batch["audio"][i, :length].numpy().tobytes())
    long_multi = [r["key"] for r in records if r["duration_s"] > 2.0 and len(r["captions"]) > 1 and r["key"] in crops]
    assert long_multi and all(len(crops[k]) > 1 for k in long_multi)  # a fresh crop per caption


def test_caption_epoch_resumes_exactly(corpus):
    """With epoch_unit caption, positions taken after 5 of 10 batches (2 workers, shuffling) make a new stream
    yield exactly batches 6-10: keys, captions and audio."""
    root, _, _ = corpus
    cfg = _cfg([root / "a"], num_workers=2, shuffle_buffer=8, shuffle_initial=4, epoch_unit="caption")
    full = _epoch(cfg, batch=4, batches=10)
    positions = {}
    for b in full[:5]:
        positions[b["worker"]] = StreamPosition(b["batches_done"], b["raw_pos"])
    rest = _epoch(cfg, batch=4, batches=10, start=positions)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[5:]]
    assert [b["captions"] for b in rest] == [b["captions"] for b in full[5:]]
    for a, b in zip(rest, full[5:]):
        np.testing.assert_array_equal(a["audio"].numpy(), b["audio"].numpy())
    keys = [k for b in full for k in b["keys"]]
    assert len(keys) > len(set(keys))  # clips come back, once per caption


def test_clip_epoch_is_unchanged_by_the_caption_unit(corpus):
    """epoch_unit clip (the default) still yields one sample per clip with a random caption of its own."""
    root, records, _ = corpus
    cfg = _cfg([root / "a"])
    assert cfg.epoch_unit == "clip" and open_train_sources(cfg, 1)[0].total_samples == 64
    batches = _epoch(cfg, batch=4, batches=4)
    captions = {r["key"]: r["captions"] for r in records}
    assert all(len(set(b["keys"])) == 4 for b in batches)  # a shard draw is its 4 clips, each once
    assert all(c in captions[k] for b in batches for k, c in zip(b["keys"], b["captions"]))


def test_caption_count_reads_local_damaged_and_s3_shards(tmp_path, s3_bucket, capfd):
    """count_captions: per-shard totals equal the json members' captions for local and S3 shards; a truncated shard
    counts the captions before the cut, with a warning."""
    records = write_shard_dir(tmp_path / "a", n_clips=12, per_shard=4, seed=4)
    want = [sum(len(r["captions"]) for r in records[i : i + 4]) for i in range(0, 12, 4)]
    urls = [str(p) for p in sorted((tmp_path / "a").glob("*.tar"))]
    assert count_captions(urls) == want
    prefix = f"{s3_bucket}/shards/a"
    for url in urls:
        storage.upload_file(url, f"{prefix}/{url.rsplit('/', 1)[-1]}")
    assert count_captions([f"{prefix}/{u.rsplit('/', 1)[-1]}" for u in urls]) == want
    truncate_shard(tmp_path / "a" / "synth-train-000001.tar", 0.5)
    got = count_captions(urls)
    assert got[0] == want[0] and got[2] == want[2] and 0 <= got[1] < want[1]
    assert "counting captions in" in capfd.readouterr().err
