import numpy as np
import pytest
from scipy import stats

from relret.metrics import retrieval_metrics
from relret.results import (
    EvalResult,
    dcase_submission_rows,
    evaluate_embeddings,
    format_table2,
    paired_ttest,
    summarize_runs,
)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _toy(seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    audio = _unit(rng.normal(size=(12, 6)))
    text_ids = np.repeat(np.arange(12) * 7 + 100, 3)  # three captions per clip, ids not 0..N-1
    text = _unit(np.repeat(audio, 3, axis=0) + noise * rng.normal(size=(36, 6)))
    return audio, np.arange(12) * 7 + 100, text, text_ids


def test_evaluate_embeddings_matches_score_matrix_metrics():
    """Both directions equal retrieval_metrics on the explicit score and relevance matrices."""
    audio, audio_ids, text, text_ids = _toy()
    res = evaluate_embeddings(audio, audio_ids, text, text_ids)
    t2a = retrieval_metrics(text @ audio.T, text_ids[:, None] == audio_ids[None, :])
    a2t = retrieval_metrics(audio @ text.T, audio_ids[:, None] == text_ids[None, :])
    assert res.metrics["t2a"] == pytest.approx(t2a)
    assert res.metrics["a2t"] == pytest.approx(a2t)
    assert res.query_ids["t2a"][:4] == ["100:0", "100:1", "100:2", "107:0"]
    assert res.metrics["a2t"]["R@1"] <= 1 / 3 + 1e-9
    assert res.info["n_clips"] == 12 and res.info["n_captions"] == 36


def test_result_json_round_trip(tmp_path):
    """A saved result loads back equal; a foreign file is refused."""
    res = evaluate_embeddings(*_toy())
    (tmp_path / "eval.json").write_text(res.to_json())
    assert EvalResult.load(tmp_path) == res
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="not a relret evaluation result"):
        EvalResult.load(tmp_path / "bad.json")


def test_summary_is_mean_and_sample_sd():
    """mean ± sd over runs uses the sample standard deviation."""
    runs = [evaluate_embeddings(*_toy(seed=s)) for s in range(3)]
    summary = summarize_runs(runs)
    values = [r.metrics["t2a"]["mAP@10"] for r in runs]
    assert summary["t2a"]["mAP@10"]["mean"] == pytest.approx(np.mean(values))
    assert summary["t2a"]["mAP@10"]["sd"] == pytest.approx(np.std(values, ddof=1))
    table = format_table2({"InfoNCE": runs, "ListNet": runs[:1]})
    lines = table.splitlines()
    assert lines[0].startswith("| Method | runs | Text-to-audio |")
    assert f"{np.mean(values) * 100:.2f} ± {np.std(values, ddof=1) * 100:.2f}" in lines[3]
    assert lines[4].startswith("| ListNet | 1 | ")


def test_paired_ttest_pairs_queries_by_id():
    """The t-test pairs queries by id even when the runs list them in different orders, and equals scipy's."""
    a = evaluate_embeddings(*_toy(seed=0, noise=0.5))
    b = evaluate_embeddings(*_toy(seed=0, noise=1.5))
    ref = stats.ttest_rel(a.per_query["t2a"]["AP@10"], b.per_query["t2a"]["AP@10"])
    perm = np.random.default_rng(1).permutation(36)
    b.query_ids["t2a"] = [b.query_ids["t2a"][i] for i in perm]
    b.per_query["t2a"] = {k: [v[i] for i in perm] for k, v in b.per_query["t2a"].items()}
    res = paired_ttest(a, b)
    assert res["t"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    assert res["n"] == 36
    assert paired_ttest(a, a)["p"] == 1.0
    b.query_ids["t2a"] = b.query_ids["t2a"][:-1]
    with pytest.raises(ValueError, match="different t2a queries"):
        paired_ttest(a, b)


def test_dcase_rows_rank_clips_per_caption():
    """Each row is the caption then its ten best clips, best first (hand-checked ordering)."""
    audio = np.eye(12, dtype=np.float32)
    text = np.zeros((1, 12), dtype=np.float32)
    text[0, [3, 7, 1]] = [0.9, 0.5, 0.7]  # then ties at 0: lower index first
    rows = dcase_submission_rows(text, ["a caption"], audio, [f"f{i}.wav" for i in range(12)])
    assert rows == [
        [
            "a caption",
            "f3.wav",
            "f1.wav",
            "f7.wav",
            "f0.wav",
            "f2.wav",
            "f4.wav",
            "f5.wav",
            "f6.wav",
            "f8.wav",
            "f9.wav",
        ]
    ]


def test_bad_evaluation_input():
    """Duplicate clip embeddings and captions of unknown clips are refused."""
    audio, audio_ids, text, text_ids = _toy()
    with pytest.raises(ValueError, match="must be unique"):
        evaluate_embeddings(audio, np.zeros(12, dtype=int), text, text_ids)
    with pytest.raises(ValueError, match="belong to clips without audio"):
        evaluate_embeddings(audio, audio_ids, text, text_ids + 1)


def test_identical_captions_merged_into_one_query_with_all_their_clips():
    """Hand-computed: two clips share the caption "a dog barks", whose embedding ranks clip 10 first and clip 11
    second. Per caption (default): AP@10 1 and 1/2 for the two copies, 1 for "rain falls". Merged: one query relevant
    to both clips, AP@10 = (1/1 + 2/2) / 2 = 1 and R@1 = 1/2; audio-to-text is unchanged."""
    import numpy as np

    from relret.results import evaluate_embeddings

    audio = np.eye(3)
    dog = np.array([0.9, 0.8, 0.1]) / np.linalg.norm([0.9, 0.8, 0.1])
    rain = np.array([0.1, 0.2, 0.9]) / np.linalg.norm([0.1, 0.2, 0.9])
    text = np.stack([dog, dog, rain])
    captions = ["a dog barks", "a dog barks", "rain falls"]
    plain = evaluate_embeddings(audio, [10, 11, 12], text, [10, 11, 12])
    assert plain.per_query["t2a"]["AP@10"] == [1.0, 0.5, 1.0]
    merged = evaluate_embeddings(audio, [10, 11, 12], text, [10, 11, 12], merge_captions=captions)
    assert merged.query_ids["t2a"] == ["10:0", "12:0"]
    assert merged.per_query["t2a"]["AP@10"] == [1.0, 1.0]
    assert merged.per_query["t2a"]["R@1"] == [0.5, 1.0] and merged.per_query["t2a"]["R@5"] == [1.0, 1.0]
    assert merged.metrics["t2a"]["mAP@10"] == 1.0 and plain.metrics["t2a"]["mAP@10"] == pytest.approx(2.5 / 3)
    assert merged.metrics["a2t"] == plain.metrics["a2t"]
    assert merged.info["n_text_queries"] == 2 and merged.info["merged_identical_captions"] is True
