import numpy as np
import pytest

from relret.index import AudioIndex


def test_search_matches_brute_force_cosine(tmp_path):
    """Top-k from the saved and reloaded faiss index equals a brute-force cosine ranking."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 16)) * rng.uniform(0.5, 3, size=(200, 1))  # unnormalised on purpose
    names = [f"clip {i}.wav" for i in range(200)]
    AudioIndex.build(emb, names, {"model": "test"}).save(tmp_path / "idx")
    index = AudioIndex.load(tmp_path / "idx").to_gpu_if_available()
    queries = rng.normal(size=(5, 16))
    got = index.search(queries, k=7)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for q, hits in zip(queries, got):
        cos = unit @ (q / np.linalg.norm(q))
        ref = np.argsort(-cos, kind="stable")[:7]
        assert [h[0] for h in hits] == [names[j] for j in ref]
        np.testing.assert_allclose([h[1] for h in hits], cos[ref], rtol=1e-5)
    assert index.meta["model"] == "test" and index.meta["count"] == 200
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["idx"]  # no temporary directory left


def test_bad_index_input(tmp_path):
    """Mismatched names, zero vectors, wrong query dimension and a non-index directory are refused."""
    with pytest.raises(ValueError, match="2 names for 3 embeddings"):
        AudioIndex.build(np.ones((3, 4)), ["a", "b"])
    with pytest.raises(ValueError, match="zero vector at row 1"):
        AudioIndex.build(np.array([[1.0, 0], [0, 0]]), ["a", "b"])
    index = AudioIndex.build(np.eye(4), list("abcd"))
    with pytest.raises(ValueError, match="query dimension 3"):
        index.search(np.ones((1, 3)))
    with pytest.raises(ValueError, match="not an index directory"):
        AudioIndex.load(tmp_path)
