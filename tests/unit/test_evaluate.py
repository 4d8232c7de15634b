"""Evaluation, export, index/search and the result tables on a tiny model trained once for this module."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from kit.shards import read_samples_with_tarfile, write_shard_dir
from scipy import stats

from relret import checkpoint as ckpt
from relret import shard_format
from relret.__main__ import main as relret_main
from relret.metrics import retrieval_metrics
from relret.results import EvalResult

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CROP_S = 4.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny model trained for 2 epochs in one process, with two checkpoints kept."""
    root = tmp_path_factory.mktemp("evaluate")
    write_shard_dir(root / "train", n_clips=48, per_shard=4, seed=1)
    write_shard_dir(root / "val", split="val", n_clips=16, per_shard=4, seed=2)
    run_dir = root / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [
        sys.executable, str(REPO / "relret" / "train.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
        "--run-dir", str(run_dir), f"data.train=[{{path: {root / 'train'}}}]", f"data.val=[{root / 'val'}]",
        "data.num_workers=0", "train.epochs=2", "data.samples_per_epoch=48", "train.checkpoint_every_steps=4",
        "train.keep_checkpoints=2", f"data.val_crop_s={CROP_S}",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {"root": root, "run_dir": run_dir, "val": root / "val"}


def _read_val_independently(val_dir: Path):
    """Clips and captions of the validation shards read with tarfile (not the training reader)."""
    clips, clip_ids, sources, captions, caption_ids = [], [], [], [], []
    for s in read_samples_with_tarfile(val_dir):
        clips.append(s.audio[: int(CROP_S * shard_format.SAMPLE_RATE_HZ)])
        clip_ids.append(s.meta.clip_id)
        sources.append(s.meta.source_file)
        captions += s.meta.captions
        caption_ids += [s.meta.clip_id] * len(s.meta.captions)
    return clips, np.array(clip_ids), sources, captions, np.array(caption_ids)


def test_evaluate_agrees_with_metrics_on_explicit_score_matrices(trained, tmp_path):
    """`relret evaluate` equals retrieval_metrics on score matrices built from clips embedded one at a time, and its
    DCASE file lists each caption's ten best clips by cosine."""
    from relret.retrieval import RetrievalModel

    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(trained["run_dir"]), "--shards", str(trained["val"]), "--out", str(out),
            "--max-duration-s", str(CROP_S), "--batch-size", "5", "--dcase", "--name", "tiny"]  # fmt: skip
    assert relret_main(argv) == 0
    result = EvalResult.load(out)
    model = RetrievalModel.load(trained["run_dir"], device="cpu")
    clips, clip_ids, sources, captions, caption_ids = _read_val_independently(trained["val"])
    audio = np.concatenate([model.encode_audio([c]) for c in clips])
    text = model.encode_text(captions)
    t2a = retrieval_metrics(text @ audio.T, caption_ids[:, None] == clip_ids[None, :])
    a2t = retrieval_metrics(audio @ text.T, clip_ids[:, None] == caption_ids[None, :])
    assert result.metrics["t2a"] == pytest.approx(t2a, abs=1e-6)
    assert result.metrics["a2t"] == pytest.approx(a2t, abs=1e-6)
    assert result.info["n_clips"] == 16 and result.info["n_captions"] == len(captions)
    assert len(result.query_ids["t2a"]) == len(captions)
    # the best checkpoint's validation during training measured the same thing
    best = ckpt.step_of_tag(ckpt.read_pointer(trained["run_dir"], ckpt.BEST))
    records = [json.loads(x) for x in (trained["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in records if r["kind"] == "val" and r["step"] == best)
    assert result.metrics["t2a"]["mAP@10"] == pytest.approx(val["t2a/mAP@10"], abs=1e-6)

    with open(out / "dcase_submission.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["caption"] + [f"file_name_{i}" for i in range(1, 11)]
    assert len(rows) == 1 + len(captions)
    by_caption = {r[0]: r[1:] for r in rows[1:]}
    for i in (0, 7, len(captions) - 1):
        best_first = [sources[j] for j in np.argsort(-(audio @ text[i]), kind="stable")[:3]]
        assert by_caption[captions[i]][:3] == best_first
    assert "| tiny | 1 |" in (out / "metrics.md").read_text()


def test_export_loads_without_training_code_and_scores_the_same(trained, tmp_path):
    """The exported directory loads with RetrievalModel.from_pretrained (no DeepSpeed, no relret.train imported)
    and gives the checkpoint's embeddings."""
    from relret.retrieval import RetrievalModel

    export = tmp_path / "exported"
    assert relret_main(["export", "--model", str(trained["run_dir"]), "--out", str(export)]) == 0
    code = (
        "import sys, numpy as np, relret\n"
        f"m = relret.RetrievalModel.from_pretrained({str(export)!r}, device='cpu')\n"
        "t = m.encode_text(['a rising chirp', 'a low hum'])\n"
        "a = m.encode_audio([np.sin(np.linspace(0, 900, 64000)).astype('float32')])\n"
        f"np.save({str(tmp_path / 'emb.npy')!r}, np.concatenate([t, a]))\n"
        "print(sorted(k for k in sys.modules if k == 'deepspeed' or k.startswith('relret.train')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    original = RetrievalModel.load(trained["run_dir"], device="cpu")
    expected = np.concatenate([
        original.encode_text(["a rising chirp", "a low hum"]),
        original.encode_audio([np.sin(np.linspace(0, 900, 64000)).astype("float32")]),
    ])  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected, atol=1e-6)
    with pytest.raises(ValueError, match="not an exported relret model"):
        RetrievalModel.from_pretrained(tmp_path)


def test_index_and_search_match_brute_force(trained, tmp_path, capsys):
    """An index of audio files (44.1 kHz stereo WAVs, resampled on the way in) returns the brute-force cosine order."""
    from relret.audio import load_clip
    from relret.retrieval import RetrievalModel

    clips, _, sources, captions, _ = _read_val_independently(trained["val"])
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    import soxr

    for clip, name in zip(clips, sources):
        stereo = np.stack([soxr.resample(clip, 32000, 44100)] * 2, axis=1)
        sf.write(audio_dir / name, stereo, 44100)
    index_dir = tmp_path / "index"
    argv = ["index", "--model", str(trained["run_dir"]), "--audio-dir", str(audio_dir), "--out", str(index_dir)]
    assert relret_main(argv) == 0
    capsys.readouterr()
    assert relret_main(["search", captions[3], "--index", str(index_dir), "-k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    got = [line.split()[-1] for line in lines[1:6]]
    model = RetrievalModel.load(trained["run_dir"], device="cpu")
    files = sorted(audio_dir.glob("*.wav"))
    audio = model.encode_audio([load_clip(str(p), 30.0) for p in files])
    ref = np.argsort(-(audio @ model.encode_text([captions[3]])[0]), kind="stable")[:5]
    assert got == [files[j].name for j in ref]
    # the same clips from the shards give the same ranking
    shard_index = tmp_path / "shard-index"
    assert relret_main(["index", "--model", str(trained["run_dir"]), "--shards", str(trained["val"]),
                        "--out", str(shard_index), "--max-duration-s", str(CROP_S)]) == 0  # fmt: skip
    capsys.readouterr()
    assert relret_main(["search", captions[3], "--index", str(shard_index), "-k", "5"]) == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:6]][:2] == got[:2]


def test_table_and_compare_over_two_checkpoints(trained, tmp_path, capsys):
    """Two checkpoints evaluated, laid out as Table II, and compared with a paired t-test equal to scipy's."""
    tags = ckpt.step_tags(trained["run_dir"])
    assert len(tags) >= 2
    evals = []
    for tag in tags[-2:]:
        out = tmp_path / tag
        argv = ["evaluate", "--model", str(trained["run_dir"] / "checkpoints" / tag), "--shards",
                str(trained["val"]), "--out", str(out), "--max-duration-s", str(CROP_S), "--name", tag]  # fmt: skip
        assert relret_main(argv) == 0
        evals.append(out)
    capsys.readouterr()
    assert relret_main(["table", "--method", f"early={evals[0]}", "--method", f"late={evals[1]},{evals[1]}",
                        "--out", str(tmp_path / "table")]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| early | 1 |" in table and "| late | 2 |" in table and "± 0.00" in table
    assert json.loads((tmp_path / "table" / "table2.json").read_text())["rows"].keys() == {"early", "late"}
    assert relret_main(["compare", str(evals[0]), str(evals[1])]) == 0
    out = capsys.readouterr().out
    a, b = EvalResult.load(evals[0]), EvalResult.load(evals[1])
    ref = stats.ttest_rel(a.per_query["t2a"]["AP@10"], b.per_query["t2a"]["AP@10"])
    assert f"p = {ref.pvalue:.3g}" in out.splitlines()[0]
    assert relret_main(["compare", str(evals[0]), str(tmp_path)]) == 2  # no eval.json there


def test_evaluate_reports_bad_paths(tmp_path, capsys):
    """A shard directory without a manifest fails with exit 2 and a message naming what to do."""
    assert relret_main(["evaluate", "--model", str(tmp_path), "--shards", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "shards/build.py" in capsys.readouterr().err


def test_evaluate_with_ratings_equals_a_hand_computed_ndcg_and_scipy(trained, tmp_path):
    """`relret evaluate --ratings DIR`: nDCG@k and the correlations of the model's cosine against hand-made ratings
    (ties, zero gains, a rated clip that is not among the evaluated ones) equal a plain-loop nDCG over cosines of
    clips embedded one at a time, and scipy's Spearman/Kendall; a ratings split that matches no clip is refused."""
    from relret.graded import RatedClip, RatedQuery, write_ratings_dir
    from relret.retrieval import RetrievalModel

    clips, clip_ids, sources, captions, caption_ids = _read_val_independently(trained["val"])
    rng = np.random.default_rng(3)
    ratings = []
    for q in range(6):
        own = q * 2
        others = rng.choice([i for i in range(len(sources)) if i != own], size=5, replace=False).tolist()
        values = [100.0, 0.0, 0.0, 37.5, 37.5, 80.0]  # ties and zero gains
        rated = [RatedClip(sources[j], v, "C", sources[j]) for j, v in zip([own, *others], values)]
        rated.append(RatedClip("not_evaluated.wav", 50.0, "C", "not_evaluated.wav"))
        query_text = captions[int(np.flatnonzero(caption_ids == clip_ids[own])[0])]
        rated.sort(key=lambda c: c.file_name)
        ratings.append(RatedQuery("evaluation", f"t{q}", query_text, sources[own], tuple(rated)))
    write_ratings_dir(ratings, tmp_path / "ratings")

    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(trained["run_dir"]), "--shards", str(trained["val"]), "--out", str(out),
            "--max-duration-s", str(CROP_S), "--ratings", str(tmp_path / "ratings")]  # fmt: skip
    assert relret_main(argv) == 0
    graded = json.loads((out / "graded.json").read_text())["model"]["evaluation"]

    model = RetrievalModel.load(trained["run_dir"], device="cpu")
    emb = {name: model.encode_audio([clip])[0] for name, clip in zip(sources, clips)}
    ndcg: dict[int, list[float]] = {5: [], 10: []}
    all_s, all_g = [], []
    for q in ratings:
        t = model.encode_text([q.query_text])[0]
        pairs = [(float(emb[c.file_name] @ t), c.rating / 100) for c in q.clips if c.file_name in emb]
        all_s += [p[0] for p in pairs]
        all_g += [p[1] for p in pairs]
        ranked = [g for _, g in sorted(pairs, key=lambda p: -p[0])]
        ideal = sorted((g for _, g in pairs), reverse=True)
        for k in ndcg:
            dcg = sum(g / np.log2(i + 2) for i, g in enumerate(ranked[:k]))
            idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal[:k]))
            ndcg[k].append(dcg / idcg)
    assert graded["pairs_without_embedding"] == 6 and graded["rated_pairs"] == 36
    assert graded["ndcg"]["nDCG@5"] == pytest.approx(np.mean(ndcg[5]), abs=1e-5)
    assert graded["ndcg"]["nDCG@10"] == pytest.approx(np.mean(ndcg[10]), abs=1e-5)
    assert graded["spearman_pooled"] == pytest.approx(stats.spearmanr(all_s, all_g).statistic, abs=1e-5)
    assert graded["kendall_tau_b_pooled"] == pytest.approx(stats.kendalltau(all_s, all_g).statistic, abs=1e-5)
    assert "Graded relevance" in (out / "graded.md").read_text()

    stranger = [RatedQuery("evaluation", "t0", "x", "a.wav", (RatedClip("a.wav", 10.0, "C", "a.wav"),))]
    write_ratings_dir(stranger, tmp_path / "stranger")
    argv[argv.index("--out") + 1] = str(tmp_path / "eval2")
    argv[argv.index("--ratings") + 1] = str(tmp_path / "stranger")
    assert relret_main(argv) == 2


def test_evaluate_zero_shot_on_a_labelled_folder_equals_a_plain_loop(trained, tmp_path):
    """`relret evaluate --labels CSV --audio-dir DIR`: top-1 accuracy equals a plain loop over the model's cosines to
    "the sound of a {class}"; --labels without --audio-dir is a usage error."""
    from relret.retrieval import RetrievalModel

    clips, *_ = _read_val_independently(trained["val"])
    classes = ["dog", "siren", "rain"]
    folder = tmp_path / "audio"
    folder.mkdir()
    rows = []
    for i, clip in enumerate(clips[:12]):
        sf.write(folder / f"c{i:02d}.wav", clip, shard_format.SAMPLE_RATE_HZ, subtype="FLOAT")
        rows.append((f"c{i:02d}.wav", classes[i % 3]))
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file_name", "class"), *rows])
    out = tmp_path / "zs"
    argv = ["evaluate", "--model", str(trained["run_dir"]), "--labels", str(tmp_path / "labels.csv"),
            "--audio-dir", str(folder), "--out", str(out), "--max-duration-s", str(CROP_S)]  # fmt: skip
    assert relret_main(argv) == 0
    got = json.loads((out / "zeroshot.json").read_text())

    model = RetrievalModel.load(trained["run_dir"], device="cpu")
    text = model.encode_text([f"the sound of a {c}" for c in sorted(classes)])
    correct = 0
    for name, label in rows:
        audio = model.encode_audio_files([folder / name], CROP_S)[0]
        scores = [float(audio @ t) for t in text]
        correct += sorted(classes)[int(np.argmax(scores))] == label
    assert got["top1_acc"] == pytest.approx(correct / len(rows))
    assert got["n_clips"] == 12 and got["n_classes"] == 3 and got["top5_acc"] == 1.0
    assert relret_main([*argv[:5], "--out", str(tmp_path / "x")]) == 2  # --labels without --audio-dir


def test_coverage_counts_the_official_clips_from_the_manifests():
    """How many of the listed clips were evaluated, per reason left out, summed over shard sets; the shard job's
    skipped_bad_input counts the missing audio too, so unreadable = bad input - missing."""
    from types import SimpleNamespace

    from relret.evaluate import coverage, coverage_line

    def shard_set(**config):
        return SimpleNamespace(manifest=SimpleNamespace(config=config))

    test = shard_set(clips_total=4875, skipped_bad_input=5, skipped_missing_audio=4, blacklisted=0)
    extra = shard_set(clips_total=10, skipped_bad_input=0, skipped_missing_audio=0, blacklisted=2)
    cov = coverage([test, extra], 4870 + 8)
    assert cov == {"listed": 4885, "evaluated": 4878, "missing_audio": 4, "unreadable": 1, "excluded": 2}
    assert cov["listed"] == cov["evaluated"] + cov["missing_audio"] + cov["unreadable"] + cov["excluded"]
    assert coverage_line(cov) == (
        "evaluated 4,878 of the 4,885 clips the metadata lists (4 missing audio, 1 unreadable, 2 excluded)"
    )
    whole = coverage([shard_set(clips_total=12, skipped_bad_input=0, skipped_missing_audio=0, blacklisted=0)], 12)
    assert coverage_line(whole) == "evaluated 12 of the 12 clips the metadata lists (all of them)"
    unknown = coverage([shard_set(), test], 99)  # a hand-built manifest without the counts
    assert unknown["listed"] is None and "do not record" in coverage_line(unknown)
