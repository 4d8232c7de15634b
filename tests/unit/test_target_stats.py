"""Target statistics per global batch size (issue #17): the diagnostic, the batch averages, the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from kit.shards import read_samples_with_tarfile, write_shard_dir

from relret import shard_format
from relret.config import RelevanceConfig
from relret.losses import GatheredBatch, ListNetLoss
from relret.relevance import PAPER_A, PAPER_B
from relret.target_stats import (
    ENTROPY,
    MAX_OTHER,
    OWN_MASS,
    batch_target_stats,
    listnet_targets,
    main,
    read_caption_vectors,
    target_diagnostics,
)

# Three unit vectors with simple cosines: 0.6, 0 and 0.48 off the diagonal.
UNIT_VECTORS = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]


def hand_targets(vectors, omega, a, b):
    """softmax(g / omega) rows, g = 1 / (1 + exp(a - b h)), h the dot products, in plain Python floats."""
    h = [[sum(x * y for x, y in zip(u, v)) for v in vectors] for u in vectors]
    g = [[1.0 / (1.0 + math.exp(a - b * hij)) for hij in row] for row in h]
    rows = []
    for row in g:
        e = [math.exp(gij / omega) for gij in row]
        rows.append([x / sum(e) for x in e])
    return rows


def loop_diagnostics(p, own):
    """Mean own-clip mass, entropy (nats) and largest other-clip probability, one row at a time."""
    mass, entropy, max_other = [], [], []
    for row, k in zip(p, own):
        mass.append(row[k])
        entropy.append(-sum(x * math.log(x) for x in row if x > 0))
        max_other.append(max([x for j, x in enumerate(row) if j != k], default=0.0))
    n = len(p)
    return sum(mass) / n, sum(entropy) / n, sum(max_other) / n


@pytest.mark.parametrize(("omega", "min_entropy"), [(0.05, 1e-3), (0.5, 0.5)])
def test_three_clips_match_hand_computation(omega, min_entropy):
    """On three hand-picked unit vectors, batch_target_stats equals the formulas computed by hand to 1e-12."""
    p = hand_targets(UNIT_VECTORS, omega, PAPER_A, PAPER_B)
    mass, entropy, max_other = loop_diagnostics(p, [0, 1, 2])
    # a sanity anchor independent of the loop: the own clip of row 0 beats clip 1 by exp((g(1) - g(0.6)) / omega)
    g1, g06 = 1 / (1 + math.exp(PAPER_A - PAPER_B)), 1 / (1 + math.exp(PAPER_A - 0.6 * PAPER_B))
    assert p[0][0] / p[0][1] == pytest.approx(math.exp((g1 - g06) / omega), rel=1e-12)

    (row,) = batch_target_stats(torch.tensor(UNIT_VECTORS, dtype=torch.float64), [3], omega, RelevanceConfig())
    assert (row.global_batch_size, row.batches, row.clips_dropped) == (3, 1, 0)
    assert row.own_mass == pytest.approx(mass, abs=1e-12)
    assert row.entropy_nats == pytest.approx(entropy, abs=1e-12)
    assert row.max_other == pytest.approx(max_other, abs=1e-12)
    assert row.own_mass < 0.9999 and row.entropy_nats > min_entropy  # not one-hot: the comparison has content


def test_batches_are_consecutive_and_the_tail_is_dropped():
    """Batches of 2 out of 3 clips: one batch of the first two clips, one clip dropped; batches of 1 are one-hot."""
    omega = 0.05
    vectors = torch.tensor(UNIT_VECTORS, dtype=torch.float64)
    two, one = batch_target_stats(vectors, [2, 1], omega)
    mass, entropy, max_other = loop_diagnostics(hand_targets(UNIT_VECTORS[:2], omega, PAPER_A, PAPER_B), [0, 1])
    assert (two.batches, two.clips_dropped) == (1, 1)
    assert (two.own_mass, two.entropy_nats, two.max_other) == pytest.approx((mass, entropy, max_other), abs=1e-12)
    assert (one.batches, one.clips_dropped) == (3, 0)
    assert (one.own_mass, one.entropy_nats, one.max_other) == (1.0, 0.0, 0.0)


def test_diagnostics_match_a_plain_loop():
    """target_diagnostics equals a row-by-row Python loop on random targets, zeros and a one-column case included."""
    gen = torch.Generator().manual_seed(3)
    for n_rows, n_cols in ((7, 11), (4, 1), (1, 5)):
        p = torch.softmax(3 * torch.randn(n_rows, n_cols, generator=gen, dtype=torch.float64), dim=1)
        if n_cols > 2:
            p[0, 1] = 0.0  # 0 ln 0 = 0
            p[0] /= p[0].sum()
        own = torch.randint(0, n_cols, (n_rows,), generator=gen)
        got = target_diagnostics(p, own)
        want = loop_diagnostics(p.tolist(), own.tolist())
        assert all(v.dim() == 0 and v.dtype == torch.float64 for v in got.values())
        assert [got[k].item() for k in (OWN_MASS, ENTROPY, MAX_OTHER)] == pytest.approx(want, abs=1e-12)


def test_diagnostics_refuse_mismatched_own():
    """An `own` of the wrong length or dtype is refused with the expected shape."""
    p = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"own must be \[R\]=3 integer"):
        target_diagnostics(p, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer column indices"):
        target_diagnostics(p, torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("fn", ["logistic", "minmax", "binary"])
def test_targets_and_diagnostics_equal_the_training_loss(fn):
    """listnet_targets equals ListNetLoss.get_targets on the same batch, and the diagnostics the loss reports per step
    equal target_diagnostics on them: the command measures what training logs."""
    gen = torch.Generator().manual_seed(0)
    sbert = torch.randn(16, 8, generator=gen)
    audio, text = torch.randn(16, 4, generator=gen), torch.randn(16, 4, generator=gen)
    relevance = RelevanceConfig(fn=fn, a=1.5, b=3.0)
    loss = ListNetLoss("t2a", omega=0.07, relevance=relevance)
    ids = torch.arange(16)
    batch = GatheredBatch(audio, text, {"caption_sbert": sbert, "clip_ids": ids}, slice(0, 16))
    targets = listnet_targets(sbert, 0.07, relevance)
    torch.testing.assert_close(targets, loss.get_targets(("t2a",), batch)["t2a"], rtol=0, atol=1e-7)

    loss.report_targets = True
    reported = loss(audio, text, sbert, ids)
    mine = target_diagnostics(targets, ids)
    for key in (OWN_MASS, ENTROPY, MAX_OTHER):
        assert reported[key].item() == pytest.approx(mine[key].item(), abs=1e-6)


def test_batch_target_stats_refuses_too_large_batches():
    """A batch size above the number of clips is refused, naming it and the clips available."""
    with pytest.raises(ValueError, match=r"batch size\(s\) 4 outside \[1, 3\]"):
        batch_target_stats(torch.tensor(UNIT_VECTORS), [2, 4])


def draw_by_hand(vectors, n_clips, seed):
    """The documented draw: a seeded permutation's first clips, then one random caption per clip, same generator."""
    rng = np.random.default_rng(seed)
    clips = rng.permutation(len(vectors))[:n_clips]
    return np.stack([vectors[c][rng.integers(len(vectors[c]))] for c in clips])


def test_command_matches_batch_target_stats(tmp_path, capsys, monkeypatch):
    """`relevance-stats` on a tiny shard directory prints and writes what batch_target_stats gives on the same draw,
    reading the vectors without decoding any audio."""
    write_shard_dir(tmp_path / "shards", n_clips=30, per_shard=8, sbert_dim=16, max_captions=3, seed=4)
    samples = read_samples_with_tarfile(tmp_path / "shards")
    found = read_caption_vectors([str(tmp_path / "shards")])
    assert found.keys == [s.key for s in samples] and found.sbert_dim == 16
    assert all(np.array_equal(a, s.sbert) for a, s in zip(found.vectors, samples))

    monkeypatch.setattr(shard_format, "decode_flac", lambda data: pytest.fail("audio was decoded"))
    out_json = tmp_path / "stats.json"
    argv = ["--shards", str(tmp_path / "shards"), "--batch-sizes", "4,8,16", "--clips", "24", "--seed", "5"]
    assert main([*argv, "--omega", "0.1", "--a", "2.0", "--b", "4.0", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out

    sbert = draw_by_hand([s.sbert for s in samples], 24, seed=5)
    rows = batch_target_stats(sbert, [4, 8, 16], 0.1, RelevanceConfig(a=2.0, b=4.0))
    written = json.loads(out_json.read_text())
    assert (written["clips_in_shards"], written["clips_drawn"]) == (30, 24)
    assert [r["batches"] for r in written["rows"]] == [6, 3, 1]
    for got, want in zip(written["rows"], rows):
        assert got["global_batch_size"] == want.global_batch_size
        assert (got["own_mass"], got["entropy_nats"], got["max_other"]) == pytest.approx(
            (want.own_mass, want.entropy_nats, want.max_other), abs=1e-12
        )
        line = (
            f"| {want.global_batch_size} | {want.own_mass:.3f} | {want.entropy_nats:.3f} | {want.max_other:.3f} "
            f"| {want.batches} |"
        )
        assert line in printed
    assert "batch 16: the incomplete last batch (8 clips) is left out" in printed
    # the shardkit captions of one class are similar (cosine about 0.9): the targets are far from one-hot
    assert rows[-1].own_mass < 0.5


def test_command_draws_all_clips_by_default_and_refuses_too_large_batches(tmp_path, capsys):
    """With fewer than 2048 clips every clip is drawn, and a batch size above that count exits 2 with one line."""
    write_shard_dir(tmp_path / "shards", n_clips=12, per_shard=4, sbert_dim=8)
    assert (
        main(["--shards", str(tmp_path / "shards"), "--batch-sizes", "4,12", "--json", str(tmp_path / "s.json")]) == 0
    )
    assert json.loads((tmp_path / "s.json").read_text())["clips_drawn"] == 12
    capsys.readouterr()
    assert main(["--shards", str(tmp_path / "shards"), "--batch-sizes", "4,32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch size(s) 32 exceed the 12 clips drawn" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--clips", "13"], "--clips 13: the shards hold 12 clips"),
        (["--batch-sizes", "4,x"], "expected comma-separated integers"),
        (["--omega", "0"], "--omega must be > 0"),
        (["--calibration", "missing.yaml"], "no file missing.yaml"),
        (["--calibration", "c.yaml", "--a", "1"], "pass either it or --a/--b"),
    ],
)
def test_command_errors_are_one_line(tmp_path, capsys, extra, message):
    """Bad options exit 2 with one line on stderr naming the problem."""
    write_shard_dir(tmp_path / "shards", n_clips=12, per_shard=4, sbert_dim=8)
    assert main(["--shards", str(tmp_path / "shards"), "--batch-sizes", "4", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_command_refuses_a_directory_without_shards(tmp_path, capsys):
    """A directory without a manifest exits 2 naming the option and what to do."""
    assert main(["--shards", str(tmp_path)]) == 2
    assert "--shards: no manifest.json" in capsys.readouterr().err
