import numpy as np
import pytest
import torch

from relret.metrics import (
    per_query_metrics,
    per_query_metrics_from_embeddings,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    topk_indices,
)


def _scores_with_ranks(n_items, relevant_ranks):
    """A score row whose items at the given 1-based ranks are relevant (score decreases with rank)."""
    order = np.arange(n_items)[::-1].astype(np.float32)  # item j has score n-j: rank j+1
    rel = np.zeros(n_items, dtype=bool)
    rel[[r - 1 for r in relevant_ranks]] = True
    return order, rel


def test_one_relevant_hand_computed():
    """Text-to-audio style (one relevant item): ranks 3, 1 and 12 give the hand-computed values."""
    rows = [_scores_with_ranks(12, [3]), _scores_with_ranks(12, [1]), _scores_with_ranks(12, [12])]
    m = retrieval_metrics(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@5"] == pytest.approx(2 / 3)
    assert m["R@10"] == pytest.approx(2 / 3)
    assert m["hit@5"] == pytest.approx(2 / 3)
    assert m["mAP@10"] == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_five_relevant_hand_computed():
    """Audio-to-text style (five relevant captions) at ranks 1, 3, 6, 11, 15; R@1 is capped at 0.2."""
    s, rel = _scores_with_ranks(20, [1, 3, 6, 11, 15])
    m = retrieval_metrics(s[None], rel[None])
    assert m["R@1"] == pytest.approx(0.2)
    assert m["R@5"] == pytest.approx(0.4)
    assert m["R@10"] == pytest.approx(0.6)
    assert m["hit@1"] == m["hit@5"] == m["hit@10"] == 1.0
    assert m["mAP@10"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 6) / 5)


def test_ties_broken_by_lower_index():
    """Equal scores rank the lower item index first."""
    scores = np.array([[0.5, 0.5, 0.5, 0.5], [0.1, 0.7, 0.7, 0.2]])
    assert topk_indices(torch.tensor(scores), 3).tolist() == [[0, 1, 2], [1, 2, 3]]
    rel = np.array([[False, False, True, False], [False, False, True, False]])
    per_q = per_query_metrics(scores, rel, ks=(1, 2), map_k=3)
    assert per_q["AP@3"].tolist() == pytest.approx([1 / 3, 1 / 2])
    assert per_q["R@1"].tolist() == [0.0, 0.0]


def _loop_metrics(scores, rel, ks=(1, 5, 10), map_k=10):
    out = {f"R@{k}": [] for k in ks} | {f"hit@{k}": [] for k in ks} | {f"AP@{map_k}": []}
    for s, r in zip(scores.tolist(), rel.tolist()):
        ranking = sorted(range(len(s)), key=lambda j: (-s[j], j))
        n_rel = sum(r)
        for k in ks:
            found = sum(r[j] for j in ranking[:k])
            out[f"R@{k}"].append(found / n_rel)
            out[f"hit@{k}"].append(float(found > 0))
        ap, hits = 0.0, 0
        for p, j in enumerate(ranking[:map_k], start=1):
            if r[j]:
                hits += 1
                ap += hits / p
        out[f"AP@{map_k}"].append(ap / n_rel)
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_against_plain_loop_with_many_ties(chunk_size):
    """Random scores quantised to force ties: every per-query value equals a plain sorted() loop, for any chunk size."""
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(40, 30)), 1).astype(np.float32)
    rel = rng.random((40, 30)) < 0.15
    rel[np.arange(40), rng.integers(0, 30, 40)] = True
    got = per_query_metrics(scores, rel, chunk_size=chunk_size)
    ref = _loop_metrics(scores, rel)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, err_msg=key)


def test_fewer_items_than_k():
    """With fewer than 10 items, R@10 counts them all."""
    m = retrieval_metrics(np.array([[0.1, 0.9, 0.3]]), np.array([[True, False, False]]))
    assert m["R@1"] == 0.0 and m["R@5"] == 1.0 and m["R@10"] == 1.0
    assert m["mAP@10"] == pytest.approx(1 / 3)


def test_embeddings_path_equals_matrix_path():
    """Chunked metrics from embeddings + labels equal metrics on the full score matrix (both directions)."""
    rng = np.random.default_rng(3)
    n_clips, caps = 25, 5
    audio = rng.normal(size=(n_clips, 8)).astype(np.float32)
    text = (np.repeat(audio, caps, axis=0) + rng.normal(size=(n_clips * caps, 8))).astype(np.float32)
    caption_clip = np.repeat(np.arange(n_clips), caps)
    t2a = per_query_metrics_from_embeddings(text, audio, caption_clip, np.arange(n_clips), chunk_size=16)
    t2a_ref = per_query_metrics(text @ audio.T, caption_clip[:, None] == np.arange(n_clips)[None, :])
    a2t = retrieval_metrics_from_embeddings(audio, text, np.arange(n_clips), caption_clip, chunk_size=4)
    a2t_ref = retrieval_metrics(audio @ text.T, np.arange(n_clips)[:, None] == caption_clip[None, :])
    for key in t2a_ref:
        np.testing.assert_allclose(t2a[key], t2a_ref[key], rtol=1e-6)
    assert a2t == pytest.approx(a2t_ref)
    assert set(a2t) == {"R@1", "R@5", "R@10", "hit@1", "hit@5", "hit@10", "mAP@10"}


def test_torch_and_numpy_inputs_agree():
    """numpy and torch inputs give the same numbers."""
    rng = np.random.default_rng(4)
    scores, rel = rng.normal(size=(6, 12)), rng.random((6, 12)) < 0.3
    rel[:, 0] = True
    assert retrieval_metrics(scores, rel) == retrieval_metrics(torch.tensor(scores), torch.tensor(rel))


@pytest.mark.parametrize(
    "scores, relevant, match",
    [
        (np.ones((2, 3)), np.zeros((2, 3), dtype=bool), "query 0 has no relevant item"),
        (np.ones((2, 3)), np.ones((2, 4), dtype=bool), "must have the shape of scores"),
        (np.array([[np.nan, 1.0]]), np.array([[True, False]]), "NaN or inf"),
        (np.ones((0, 3)), np.ones((0, 3), dtype=bool), "non-empty"),
        (np.ones((1, 2)), np.array([[0.5, 1.0]]), "boolean"),
    ],
)
def test_bad_input(scores, relevant, match):
    """No relevant item, shape mismatch, NaN, empty input and non-boolean relevance raise ValueError."""
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(scores, relevant)
