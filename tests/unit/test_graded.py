import json
import math

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from relret import graded
from relret.graded import RatedClip, RatedQuery


def test_ndcg_hand_computed_with_ties_and_zero_gains():
    """nDCG@k ranks by score with equal scores ordered by lower index; values match a hand computation."""
    scores = [0.5, 0.9, 0.5, 0.9, 0.1, 0.3]
    gains = [3, 0, 2, 1, 0, 2]
    # Ranking: 0.9 tie -> items 1, 3; 0.5 tie -> items 0, 2; then 5 (0.3), 4 (0.1). Gains in rank order: 0,1,3,2,2,0.
    # Ideal order of the gains: 3, 2, 2, 1, 0, 0.
    dcg3 = 0 / math.log2(2) + 1 / math.log2(3) + 3 / math.log2(4)
    idcg3 = 3 / math.log2(2) + 2 / math.log2(3) + 2 / math.log2(4)
    assert graded.ndcg_at_k(scores, gains, 3) == pytest.approx(dcg3 / idcg3)
    assert dcg3 / idcg3 == pytest.approx(0.404977, abs=1e-6)  # the other tie order would give 0.380094
    dcg6 = dcg3 + 2 / math.log2(5) + 2 / math.log2(6) + 0 / math.log2(7)
    idcg6 = idcg3 + 1 / math.log2(5) + 0 / math.log2(6) + 0 / math.log2(7)
    assert graded.ndcg_at_k(scores, gains, 6) == pytest.approx(dcg6 / idcg6)
    assert graded.ndcg_at_k(scores, gains, 10) == pytest.approx(dcg6 / idcg6)  # k beyond n: all items
    assert graded.ndcg_at_k(scores, gains, 1) == 0.0  # the top item (index 1) has gain 0


def test_ndcg_undefined_for_all_zero_gains_and_refuses_bad_input():
    """All gains 0 -> None; negative gains, mismatched lengths and k < 1 are refused."""
    assert graded.ndcg_at_k([0.3, 0.2, 0.1], [0, 0, 0], 2) is None
    with pytest.raises(ValueError, match="gains must be >= 0"):
        graded.ndcg_at_k([0.3, 0.2], [1, -1], 2)
    with pytest.raises(ValueError, match="same length"):
        graded.ndcg_at_k([0.3, 0.2], [1], 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        graded.ndcg_at_k([0.3], [1], 0)


def _query(qid, ratings, split="s", own=None):
    names = sorted(ratings)
    return RatedQuery(split, qid, f"text {qid}", own or names[0], tuple(RatedClip(n, float(ratings[n])) for n in names))


def test_graded_metrics_tiny_hand_built():
    """Known 2-D embeddings: nDCG, Spearman, Kendall tau-b and the counts match a hand computation."""
    ratings = [_query("q1", {"A": 100, "B": 50, "C": 0}), _query("q2", {"A": 0, "B": 0})]
    clips = {"A": [1.0, 0.0], "B": [0.0, 1.0], "C": [0.6, 0.8]}
    query_emb = np.array([[2.0, 0.0], [0.0, 1.0]])  # not unit: cosines do not depend on the scale
    report = graded.graded_metrics(query_emb, clips, ratings, ks=(1, 3))
    s = report.model["s"]
    # q1: cosines A 1, B 0, C 0.6 -> ranking A, C, B with gains 1, 0, 0.5; ideal 1, 0.5, 0.
    assert s.ndcg["nDCG@3"] == pytest.approx((1 + 0 + 0.5 / 2) / (1 + 0.5 / math.log2(3)))
    assert s.ndcg["nDCG@1"] == 1.0
    # q1 ranks: cosine (3, 1, 2), rating (3, 2, 1): rho = 1 - 6 * (0 + 1 + 1) / (3 * 8); tau = (2 - 1) / 3.
    assert s.spearman_mean_per_query == pytest.approx(0.5)
    assert s.kendall_tau_b_mean_per_query == pytest.approx(1 / 3)
    assert (s.queries, s.rated_pairs, s.queries_all_zero_gain, s.queries_without_correlation) == (2, 5, 1, 1)
    pooled_cos, pooled_gain = [1.0, 0.0, 0.6, 0.0, 1.0], [1.0, 0.5, 0.0, 0.0, 0.0]
    assert s.spearman_pooled == pytest.approx(spearmanr(pooled_cos, pooled_gain).statistic)
    assert s.kendall_tau_b_pooled == pytest.approx(kendalltau(pooled_cos, pooled_gain).statistic)
    assert list(report.model) == ["s"]  # one split: no "all"


def test_graded_metrics_matches_scipy_on_random_data_and_counts_missing_clips():
    """Random embeddings and ratings over two splits: the correlations equal scipy's on the matched pairs."""
    rng = np.random.default_rng(0)
    names = [f"c{i}.wav" for i in range(12)]
    ratings = [
        _query(f"{split}{q}", {n: int(rng.integers(0, 101)) for n in rng.choice(names, 6, replace=False)}, split)
        for split in ("dev", "eval")
        for q in range(4)
    ]
    emb = {split: {n: rng.normal(size=5) for n in names[:10]} for split in ("dev", "eval")}  # c10, c11 missing
    query_emb = rng.normal(size=(len(ratings), 5))
    report = graded.graded_metrics(query_emb, emb, ratings, ks=(3, 6))
    assert list(report.model) == ["dev", "eval", "all"]
    cos_all, gain_all, rhos, taus = [], [], [], []
    n_missing = 0
    for q, vec in zip(ratings, query_emb):
        cos, gain = [], []
        for c in q.clips:
            if c.file_name not in emb[q.split]:
                n_missing += 1
                continue
            e = emb[q.split][c.file_name]
            cos.append(vec @ e / np.linalg.norm(vec) / np.linalg.norm(e))
            gain.append(c.rating / 100)
        cos_all += cos
        gain_all += gain
        rhos.append(spearmanr(cos, gain).statistic)
        taus.append(kendalltau(cos, gain).statistic)
    s = report.model["all"]
    assert s.pairs_without_embedding == n_missing > 0
    assert s.rated_pairs == len(cos_all) == 48 - n_missing
    assert s.spearman_pooled == pytest.approx(spearmanr(cos_all, gain_all).statistic)
    assert s.kendall_tau_b_pooled == pytest.approx(kendalltau(cos_all, gain_all).statistic)
    assert s.spearman_mean_per_query == pytest.approx(np.mean(rhos))
    assert s.kendall_tau_b_mean_per_query == pytest.approx(np.mean(taus))
    assert report.model["dev"].rated_pairs + report.model["eval"].rated_pairs == s.rated_pairs
    json.dumps(report.to_dict())  # JSON-able as it is
    table = graded.format_graded(report)
    assert "| all | model vs human | 8 |" in table and "nDCG@6" in table


def test_target_scores_and_model_against_target():
    """With target_h, g = 1/(1+exp(a-bh)) is scored on the model's pairs, with its MAE against rating/100."""
    ratings = [_query("q1", {"A": 100, "B": 50, "C": 0})]
    h = [np.array([0.9, 0.5, 0.1])]
    a, b = 2.73, 4.58
    g = 1 / (1 + np.exp(a - b * h[0]))
    clips = {"A": [1.0, 0.0], "B": [0.0, 1.0]}  # C has no embedding: the target skips it too
    report = graded.graded_metrics(np.array([[1.0, 0.0]]), clips, ratings, ks=(2,), target_h=h, a=a, b=b)
    t = report.target["s"]
    assert t.rated_pairs == 2 and t.pairs_without_embedding == 1
    assert t.mae == pytest.approx((abs(g[0] - 1.0) + abs(g[1] - 0.5)) / 2)
    assert t.ndcg["nDCG@2"] == 1.0  # g ranks A above B, as the ratings do
    assert report.model_vs_target["s"].ndcg["nDCG@2"] == pytest.approx(1.0)  # the model ranks A (cos 1) above B (cos 0)
    full = graded.target_metrics(ratings, h, a, b, ks=(3,))["s"]
    assert full.rated_pairs == 3 and full.spearman_pooled == pytest.approx(1.0)
    assert "target g vs human" in graded.format_graded(report)


def test_target_similarity_leaves_own_caption_out():
    """h is the mean cosine to the clip's captions without the query's own caption, from precomputed vectors."""
    ratings = [RatedQuery("s", "q", "q", "A.wav", (RatedClip("A.wav", 90.0), RatedClip("B.wav", 40.0)))]
    vectors = {"q": [2.0, 0.0], "c1": [0.0, 1.0], "c2": [0.6, 0.8], "d1": [0.8, 0.6], "d2": [1.0, 0.0]}
    captions = {"A.wav": ["c1", "q", "c2"], "B.wav": ["d1", "d2"]}
    h, revised = graded.target_similarity(ratings, captions, vectors)
    assert h[0].tolist() == pytest.approx([(0.0 + 0.6) / 2, (0.8 + 1.0) / 2]) and revised == 0
    with pytest.raises(ValueError, match="no precomputed Sentence-BERT vector"):
        graded.target_similarity(ratings, captions, {k: v for k, v in vectors.items() if k != "d2"})


def test_no_matching_clip_raises():
    """When no rated clip has an embedding the error names the counts and what to check."""
    ratings = [_query("q1", {"A.wav": 100, "B.wav": 0})]
    with pytest.raises(ValueError, match=r"0 of 2 rated \(query, clip\) pairs .* 1 embedded clips .*split"):
        graded.graded_metrics(np.ones((1, 2)), (["Z.wav"], np.ones((1, 2))), ratings)


def test_several_splits_need_embeddings_per_split():
    """One set of clip embeddings for ratings of several splits is refused (Clotho reuses file names)."""
    ratings = [_query("q1", {"A": 1}, "dev"), _query("q2", {"A": 1}, "eval")]
    with pytest.raises(ValueError, match="reuses some file names"):
        graded.graded_metrics(np.ones((2, 2)), {"A": [1.0, 0.0]}, ratings)


def test_read_real_ratings(shared_data):
    """The shared ratings: 200 queries x 17 clips per split, one TP (the query's own clip) each, no repeated pair."""
    ratings = graded.read_ratings_dir(shared_data / "relevance_ratings")
    for split in ("development", "validation", "evaluation"):
        queries = [q for q in ratings if q.split == split]
        assert len(queries) == 200
        assert sum(len(q.clips) for q in queries) == 3400
        assert all(len(q.clips) == 17 for q in queries)
    assert all([c.file_name for c in q.clips] == sorted(c.file_name for c in q.clips) for q in ratings)
    tps = [[c for c in q.clips if c.group == "TP"] for q in ratings]
    assert all(len(tp) == 1 and tp[0].file_name == q.query_file for tp, q in zip(tps, ratings))
    assert all(c.n_ratings == 1 and 0 <= c.rating <= 100 for q in ratings for c in q.clips)
    first = graded.read_ratings_dir(shared_data / "relevance_ratings" / "evaluation_relevances_joined.csv")
    assert first == [q for q in ratings if q.split == "evaluation"]


def test_repeated_pairs_are_averaged(tmp_path):
    """A (query, clip) pair rated in two rows gets the mean rating and n_ratings 2."""
    header = ",".join(graded.JOINED_COLUMNS)
    rows = ["s,t1,a dog,A.wav,f1,A.wav,TP,90", "s,t1,a dog,A.wav,f2,B.wav,C15,20", "s,t1,a dog,A.wav,f2,B.wav,C15,41"]
    (tmp_path / "s_relevances_joined.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    (q,) = graded.read_ratings_dir(tmp_path)
    assert q.clips == (RatedClip("A.wav", 90.0, "TP", "f1", 1), RatedClip("B.wav", 30.5, "C15", "f2", 2))
    with pytest.raises(ValueError, match="no \\*_relevances_joined.csv"):
        graded.read_ratings_dir(tmp_path / "empty")


def test_ratings_from_scenes_round_trip(tmp_path):
    """Synthetic ratings: own clip 100 (TP), others 100 x Jaccard of event types; written and read back equal."""
    import csv

    from shards.synth import write_corpus

    captions_csv = write_corpus(tmp_path / "corpus", clips=30, seed=3, min_s=0.05, max_s=0.1, sample_rate_hz=8000)
    scenes_path = tmp_path / "corpus" / "scenes_development.json"
    scenes = json.loads(scenes_path.read_text())
    with open(captions_csv, newline="") as fh:
        captions = {row["file_name"]: [row[f"caption_{k}"] for k in range(1, 6)] for row in csv.DictReader(fh)}
    ratings = graded.ratings_from_scenes(scenes_path, captions, clips_per_query=6, queries=10, seed=1)
    assert ratings == graded.ratings_from_scenes(scenes, captions, clips_per_query=6, queries=10, seed=1)
    assert ratings != graded.ratings_from_scenes(scenes, captions, clips_per_query=6, queries=10, seed=2)
    assert len(ratings) == 10 and len({q.query_file for q in ratings}) == 10
    for q in ratings:
        assert len(q.clips) == 6 and q.query_text in captions[q.query_file]
        own = [c for c in q.clips if c.group == "TP"]
        assert [c.file_name for c in own] == [q.query_file] and own[0].rating == 100
        mine = {e["type"] for e in scenes[q.query_file]}
        for c in q.clips:
            theirs = {e["type"] for e in scenes[c.file_name]}
            assert c.rating == round(100 * len(mine & theirs) / len(mine | theirs), 2)
    written = graded.write_ratings_dir(ratings, tmp_path / "ratings")
    assert [p.name for p in written] == ["development_relevances_joined.csv"]
    assert graded.read_ratings_dir(tmp_path / "ratings") == ratings
