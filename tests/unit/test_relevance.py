import math

import numpy as np
import pytest
import torch

from relret.relevance import caption_similarity, logistic, relevance_from_similarity, relevance_matrix


def _unit(rows):
    x = np.asarray(rows, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_logistic_matches_formula():
    """g = 1/(1+exp(a - b h)) elementwise, for the paper's constants and others."""
    h = torch.tensor([-1.0, 0.0, 0.3, 0.596, 1.0], dtype=torch.float64)
    for a, b in [(2.73, 4.58), (1.0, 2.0)]:
        expected = [1 / (1 + math.exp(a - b * v)) for v in h.tolist()]
        assert logistic(h, a, b).tolist() == pytest.approx(expected, rel=1e-12)
    assert logistic(2.73 / 4.58).item() == pytest.approx(0.5)


def test_relevance_matrix_logistic_against_loop():
    """[Q,N] relevance equals f(cosine) computed pair by pair in plain Python."""
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(3, 5)), rng.normal(size=(4, 5)) * 3  # not unit norm: cosine must normalise
    g = relevance_matrix(q, c).double()
    for i in range(3):
        for j in range(4):
            cos = q[i] @ c[j] / (np.linalg.norm(q[i]) * np.linalg.norm(c[j]))
            assert g[i, j].item() == pytest.approx(1 / (1 + math.exp(2.73 - 4.58 * cos)), abs=1e-6)


def test_minmax_scales_each_row():
    """minmax maps each row's smallest similarity to 0 and largest to 1, linearly between."""
    h = torch.tensor([[0.2, 0.6, 0.4], [0.5, 0.5, 0.5]])
    g = relevance_from_similarity(h, "minmax")
    assert g[0].tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert g[1].tolist() == [0.0, 0.0, 0.0]  # no spread: a uniform target, documented


def test_binary_uses_positives_and_refuses_empty_rows():
    """binary relevance is the positive mask; a row without a positive is refused."""
    h = torch.zeros(2, 3)
    pos = torch.tensor([[True, False, False], [False, True, True]])
    assert relevance_from_similarity(h, "binary", positives=pos).tolist() == [[1, 0, 0], [0, 1, 1]]
    with pytest.raises(ValueError, match="row 1 has no relevant clip"):
        relevance_from_similarity(h, "binary", positives=torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="needs `positives`"):
        relevance_from_similarity(h, "binary")


def test_aggregates_over_captions_against_loop():
    """mean/max/paired over a clip's captions honour the mask, computed against a loop."""
    rng = np.random.default_rng(1)
    q = _unit(rng.normal(size=(2, 4)))
    clips = rng.normal(size=(3, 5, 4))
    mask = np.ones((3, 5), dtype=bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    clips[1, 3:] = 1e6  # padding must never count
    h_mean = caption_similarity(q, clips, "mean", mask).double()
    h_max = caption_similarity(q, clips, "max", mask).double()
    h_pair = caption_similarity(q, clips, "paired", mask, paired_index=[4, 2, 0]).double()
    for i in range(2):
        for n in range(3):
            cos = [q[i] @ _unit(clips[n, c]) for c in range(5) if mask[n, c]]
            assert h_mean[i, n].item() == pytest.approx(np.mean(cos), abs=1e-6)
            assert h_max[i, n].item() == pytest.approx(np.max(cos), abs=1e-6)
    assert h_pair[0, 1].item() == pytest.approx(q[0] @ _unit(clips[1, 2]), abs=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: relevance_matrix(torch.ones(2, 3), torch.ones(2, 4)), "dimension 3 but clip_sbert has 4"),
        (lambda: relevance_matrix(torch.ones(2, 3), torch.ones(2, 3), fn="sigmoid"), "unknown relevance fn 'sigmoid'"),
        (lambda: relevance_matrix(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2)), "query_sbert holds NaN"),
        (
            lambda: relevance_matrix(torch.ones(1, 2), torch.tensor([[float("inf"), 0.0]])),
            "clip_sbert holds NaN or inf",
        ),
        (lambda: relevance_matrix(torch.zeros(1, 2), torch.ones(1, 2)), "query_sbert has a zero-norm vector"),
        (lambda: relevance_matrix(torch.ones(0, 2), torch.ones(1, 2)), "query_sbert is empty"),
        (lambda: relevance_matrix(torch.ones(2), torch.ones(1, 2)), "must have 2 dimensions"),
        (lambda: relevance_matrix(torch.ones(1, 2), torch.ones(1, 2), aggregate="median"), "unknown aggregate"),
        (lambda: relevance_matrix(torch.ones(1, 2), torch.ones(1, 2), aggregate="mean"), "needs every caption"),
        (lambda: relevance_matrix(torch.ones(1, 2), torch.ones(1, 3, 2)), "needs paired_index"),
        (
            lambda: relevance_matrix(torch.ones(1, 2), torch.ones(1, 2, 2), aggregate="mean", caption_mask=[[0, 0]]),
            "clip 0 has no caption",
        ),
    ],
)
def test_bad_input_is_refused(call, match):
    """Shape mismatches, NaN/inf, zero norms, empty input and unknown options raise a ValueError naming them."""
    with pytest.raises(ValueError, match=match):
        call()


def test_real_sbert_relevance_orders_paraphrases_first(sbert_model):
    """With the real MiniLM model, a paraphrase of the query is more relevant than an unrelated caption."""
    from relret.sbert import embed_captions

    emb = embed_captions(sbert_model, ["a dog barks loudly", "a dog is barking", "rain falls on a tin roof"])
    g = relevance_matrix(emb[:1], emb)[0]
    assert g[0] > g[1] > g[2]
    assert g[0].item() == pytest.approx(1 / (1 + math.exp(2.73 - 4.58)), abs=1e-4)  # h = 1 for the caption itself


def test_cpu_embedding_batches_give_each_caption_its_own_embedding(sbert_model):
    """The CPU default (small length-sorted batches) embeds every caption as it would be embedded alone."""
    from relret.sbert import CPU_BATCH_SIZE, embed_captions

    words = "a dog barks loudly while rain falls on a tin roof and a car passes by in the distance".split()
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(words, size=rng.integers(2, 17))) for _ in range(3 * CPU_BATCH_SIZE + 5)]
    emb = embed_captions(sbert_model, captions)
    assert emb.shape == (len(captions), 384)
    for i in rng.choice(len(captions), size=12, replace=False):
        alone = sbert_model.encode([captions[i]], normalize_embeddings=True)[0]
        np.testing.assert_allclose(emb[i], alone, atol=1e-5)


def test_a_captions_vector_does_not_depend_on_its_batch(sbert_model):
    """The shards store float16 vectors and a resumed job embeds other batches than the first run: every caption's
    vector is the same to the bit whatever captions share its batch and however many (padding to the caption's own
    length bucket; padding to a batch's longest changed 11-16 of 64 real Clotho vectors here)."""
    import csv

    from conftest import SHARED_DATA

    from relret.sbert import embed_captions

    path = SHARED_DATA / "clotho" / "clotho_captions_development.csv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with path.open(encoding="utf-8", newline="") as fh:
        captions = [c for row in list(csv.DictReader(fh))[:13] for c in list(row.values())[1:6]]
    whole = embed_captions(sbert_model, captions).astype(np.float16)
    for size in (1, 4, 7, 20):
        parts = [embed_captions(sbert_model, captions[i : i + size]) for i in range(0, len(captions), size)]
        assert np.array_equal(np.concatenate(parts).astype(np.float16), whole), size
    reversed_order = embed_captions(sbert_model, captions[::-1], batch_size=5)[::-1].astype(np.float16)
    assert np.array_equal(reversed_order, whole)
