"""Graded-relevance evaluation against crowdsourced ratings: nDCG@k and rank correlations (Xie et al., DCASE 2023).

The ratings ("TAU Audio-Text Graded Relevances 2023") give, per Clotho split, 200 queries (a caption) x 17 clips
(TP = the query's own clip, TN = a random clip, C15 = 15 candidates) a human rating in 0..100. A model is scored
on each query's rated clips only:

- nDCG@k: the query's rated clips ranked by model cosine, descending, equal scores ordered by lower index (the
  `relret.metrics.topk_indices` rule); gain = rating / 100 (linear); DCG@k = sum_{i<=k} gain_(i) / log2(i + 1);
  IDCG@k is the DCG@k of the gains sorted descending. Undefined (None) when every gain is 0; such queries are
  counted and left out of the mean. k larger than a query's clip count means all of them.
- Spearman and Kendall tau-b between model cosine and rating, "pooled" over all rated (query, clip) pairs and
  "mean_per_query" (the mean of the per-query correlations over the queries where both vary).

The same numbers for the training target g = logistic(h; a, b) (h = mean Sentence-BERT cosine between the query
and the clip's captions, the query's own caption left out; see `relret.calibrate`) show how far the model's ranking
is from the humans' and from the target it was trained towards. g is monotone in h, so its rank metrics are those
of h; only its MAE against rating/100 depends on (a, b).

Each query's clips are kept in file-name order, never in the ratings file's row order: the shared files list each
query's clips by rating, descending, so with the lower-index tie rule a model that scores every clip alike would
otherwise get nDCG = 1.

For the synthetic demo corpus (`shards/synth.py`), `ratings_from_scenes` builds ratings of the same structure from
the clips' true events, and `write_ratings_dir` writes them in the joined-CSV layout that `read_ratings_dir` reads.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relret.calibrate import RATING_SCALE, Rating, query_clip_similarity, read_ratings
from relret.metrics import topk_indices
from relret.relevance import PAPER_A, PAPER_B, logistic
from relret.storage import atomic_local_file

JOINED_SUFFIX = "_relevances_joined.csv"
JOINED_COLUMNS = ("split", "tid", "query_text", "query_source_file", "fid", "file_name", "fid_group", "rating")
DEFAULT_KS = (5, 10, 17)
OWN_GROUP = "TP"
SYNTH_OTHER_GROUP = "random"

# One set of clip embeddings: {file_name: vector [E]} or (file_names, matrix [N, E]).
ClipEmbeddings = Mapping[str, Any] | tuple[Sequence[str], Any]


@dataclasses.dataclass(frozen=True)
class RatedClip:
    """One rated clip of a query."""

    file_name: str
    """Clip file name as in the captions CSV (with extension)."""
    rating: float
    """Human rating 0..100; the mean when several rows rate the same (query, clip) pair."""
    group: str = ""
    """How the clip was chosen: TP (the query's own clip), TN (random), C15 (candidate), or a synthetic label."""
    clip_id: str = ""
    """The dataset's clip id (`fid`), kept for writing the ratings back."""
    n_ratings: int = 1
    """Rows averaged into `rating`."""


@dataclasses.dataclass(frozen=True)
class RatedQuery:
    """A query caption with its rated clips (in file-name order)."""

    split: str
    query_id: str
    """The dataset's query id (`tid`), unique within a split."""
    query_text: str
    query_file: str
    """The clip the query caption was written for."""
    clips: tuple[RatedClip, ...]


@dataclasses.dataclass
class GradedSummary:
    """Rank agreement between scores and gains over one split (or "all")."""

    queries: int
    """Queries with at least one rated clip that has an embedding."""
    rated_pairs: int
    """(query, clip) pairs evaluated."""
    pairs_without_embedding: int
    """Rated pairs skipped because their clip has no embedding."""
    queries_without_clips: int
    """Queries skipped because none of their rated clips has an embedding."""
    queries_all_zero_gain: int
    """Queries whose gains are all 0: nDCG undefined, left out of its mean."""
    ndcg: dict[str, float | None]
    """"nDCG@k" -> mean over queries with a defined nDCG (None when there is none)."""
    spearman_pooled: float | None
    kendall_tau_b_pooled: float | None
    spearman_mean_per_query: float | None
    kendall_tau_b_mean_per_query: float | None
    queries_without_correlation: int
    """Queries left out of the per-query means: fewer than two clips, or constant scores or gains."""
    mae: float | None = None
    """Mean |score - gain|, only where the scores are on the gains' scale (the target g against rating/100)."""


@dataclasses.dataclass
class GradedReport:
    """Graded-relevance evaluation; each part maps split (and "all" when there are several) -> summary."""

    model: dict[str, GradedSummary]
    """Model cosine scored against gains = rating / 100."""
    target: dict[str, GradedSummary] | None = None
    """The training target g scored against rating / 100, over the same pairs as the model."""
    model_vs_target: dict[str, GradedSummary] | None = None
    """Model cosine scored against gains = g: how closely the model follows its own target."""
    ks: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_KS))
    info: dict[str, object] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able dict (None for undefined values)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing ratings


def _id_columns(path: Path) -> list[tuple[str, str, str]]:
    """(tid, fid, fid_group) per data row, in the order `calibrate.read_ratings` returns the rows."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if "tid" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: ratings CSV lacks the query id column tid; expected {','.join(JOINED_COLUMNS)}")
        return [(row["tid"], row.get("fid") or "", row.get("fid_group") or "") for row in reader]


def read_ratings_dir(directory: str | Path) -> list[RatedQuery]:
    """Every `*_relevances_joined.csv` under `directory` (or that one file), grouped into queries.

    Columns `split,tid,query_text,query_source_file,fid,file_name,fid_group,rating` (fid and fid_group optional).
    A (split, tid, file_name) pair rated in several rows gets the mean rating and `n_ratings` > 1 (the shared data
    has one row per pair). Queries keep the order of first appearance; each query's clips are sorted by file name.
    """
    path = Path(directory)
    files = [path] if path.is_file() else sorted(path.glob(f"*{JOINED_SUFFIX}"))
    if not files:
        raise ValueError(
            f"no *{JOINED_SUFFIX} file under {path}; pass the relevance_ratings folder or one written by "
            "relret.graded.write_ratings_dir"
        )
    queries: dict[tuple[str, str], dict] = {}
    for f in files:
        rows = read_ratings(f)
        ids = _id_columns(f)
        assert len(ids) == len(rows), f"{f}: {len(ids)} id rows for {len(rows)} ratings"
        for r, (tid, fid, group) in zip(rows, ids):
            q = queries.setdefault((r.split, tid), {"text": r.query_text, "file": r.query_file, "clips": {}})
            if (q["text"], q["file"]) != (r.query_text, r.query_file):
                raise ValueError(
                    f"{f}: query {tid!r} of split {r.split!r} appears with two texts or source files "
                    f"({q['text']!r} of {q['file']!r} and {r.query_text!r} of {r.query_file!r}); query ids must be "
                    "unique within a split"
                )
            clip = q["clips"].setdefault(r.file_name, {"ratings": [], "group": group, "fid": fid})
            clip["ratings"].append(r.rating)
    return [
        RatedQuery(
            split,
            tid,
            q["text"],
            q["file"],
            tuple(
                RatedClip(name, float(np.mean(c["ratings"])), c["group"], c["fid"], len(c["ratings"]))
                for name, c in sorted(q["clips"].items())
            ),
        )
        for (split, tid), q in queries.items()
    ]


def _format_rating(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_ratings_dir(ratings: Sequence[RatedQuery], directory: str | Path) -> list[Path]:
    """Write `{split}_relevances_joined.csv` per split (atomically), the layout `read_ratings_dir` reads.

    A pair whose rating is a mean of several rows is written once with the mean. Returns the files written.
    """
    by_split: dict[str, list[RatedQuery]] = {}
    for q in ratings:
        if not q.split or any(c in q.split for c in "/\\") or q.split.startswith("."):
            raise ValueError(f"split name {q.split!r} cannot be part of a file name")
        by_split.setdefault(q.split, []).append(q)
    if not by_split:
        raise ValueError("no ratings to write")
    out = []
    for split, queries in by_split.items():
        path = Path(directory) / f"{split}{JOINED_SUFFIX}"
        with atomic_local_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(JOINED_COLUMNS)
            for q in queries:
                for c in q.clips:
                    fid = c.clip_id or c.file_name
                    rating = _format_rating(c.rating)
                    writer.writerow([split, q.query_id, q.query_text, q.query_file, fid, c.file_name, c.group, rating])
        out.append(path)
    return out


def _event_types(events: Sequence[Mapping[str, object]]) -> frozenset[str]:
    return frozenset(str(e["type"]) for e in events)


def ratings_from_scenes(
    scenes: Mapping[str, Sequence[Mapping[str, object]]] | str | Path,
    captions: Mapping[str, Sequence[str]],
    clips_per_query: int = 17,
    queries: int = 200,
    seed: int = 0,
    split: str = "development",
) -> list[RatedQuery]:
    """Ratings in the crowdsourced layout for the synthetic corpus, from its true events (`scenes_{split}.json`).

    Queries: one caption (chosen at random) of each of `queries` distinct clips drawn at random (all clips if the
    corpus is smaller). Rated clips: the query's own clip (group TP) and `clips_per_query - 1` other clips drawn at
    random (group "random"). Rating = 100 x the Jaccard overlap of the two clips' sets of event types
    (|A & B| / |A | B|; attributes and loudness ignored), rounded to 2 decimals: 100 for the own clip or any clip
    with the same event types, 0 for no shared type. Deterministic in `seed`.
    """
    if isinstance(scenes, (str, Path)):
        scenes = json.loads(Path(scenes).read_text(encoding="utf-8"))
    if clips_per_query < 1 or queries < 1:
        raise ValueError(f"need clips_per_query >= 1 and queries >= 1, got {clips_per_query} and {queries}")
    names = sorted(n for n in scenes if captions.get(n))
    if not names:
        raise ValueError(
            f"none of the {len(scenes)} clips in the scenes has captions; pass the captions CSV of the same corpus"
        )
    types = [_event_types(scenes[n]) for n in names]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(names), size=min(queries, len(names)), replace=False)
    out = []
    for qi, i in enumerate(picked.tolist()):
        caps = list(captions[names[i]])
        text = caps[int(rng.integers(len(caps)))]
        others = np.delete(np.arange(len(names)), i)
        chosen = rng.choice(others, size=min(clips_per_query - 1, len(others)), replace=False).tolist()
        clips = []
        for j in [i, *chosen]:
            overlap = len(types[i] & types[j]) / len(types[i] | types[j])
            group = OWN_GROUP if j == i else SYNTH_OTHER_GROUP
            clips.append(RatedClip(names[j], round(RATING_SCALE * overlap, 2), group, names[j]))
        clips.sort(key=lambda c: c.file_name)
        out.append(RatedQuery(split, f"q{qi:05d}", text, names[i], tuple(clips)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _as_float64(x, name: str, ndim: int) -> np.ndarray:
    arr = torch.as_tensor(x).detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf")
    return arr


def ndcg_at_k(scores, gains, k: int) -> float | None:
    """nDCG@k of the ranking by `scores` [n] (descending, equal scores ordered by lower index) under `gains` [n] >= 0.

    DCG@k = sum_{i=1..min(k,n)} gain_(i) / log2(i + 1); IDCG@k is the same for the gains sorted descending.
    None when every gain is 0 (the ideal DCG is 0 and nDCG undefined).
    """
    s = _as_float64(scores, "scores", 1)
    g = _as_float64(gains, "gains", 1)
    if s.shape != g.shape or len(s) == 0:
        raise ValueError(f"scores {s.shape} and gains {g.shape} must be non-empty and of the same length")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if (g < 0).any():
        raise ValueError(f"gains must be >= 0, got {g.min()}")
    depth = min(k, len(g))
    discount = 1.0 / np.log2(np.arange(2, depth + 2))
    ideal = float(np.sort(g)[::-1][:depth] @ discount)
    if ideal == 0:
        return None
    order = topk_indices(torch.from_numpy(s)[None], depth)[0].numpy()
    return float(g[order] @ discount) / ideal


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(Spearman, Kendall tau-b), or None when undefined (fewer than two items or a constant side)."""
    from scipy.stats import kendalltau, spearmanr

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y, variant="b").statistic)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _summary(scores: Sequence[np.ndarray], gains: Sequence[np.ndarray], ks: Sequence[int], mae: bool) -> GradedSummary:
    """`scores[q]` [n_q] with NaN where the clip has no embedding, `gains[q]` [n_q] in [0, 1]."""
    ndcg: dict[int, list[float]] = {k: [] for k in ks}
    per_query: list[tuple[float, float]] = []
    pooled_s, pooled_g = [], []
    n_queries = n_missing = n_empty = n_zero = n_no_corr = 0
    for s, g in zip(scores, gains):
        ok = ~np.isnan(s)
        n_missing += int((~ok).sum())
        if not ok.any():
            n_empty += 1
            continue
        s, g = s[ok], g[ok]
        n_queries += 1
        pooled_s.append(s)
        pooled_g.append(g)
        if g.max() == 0:
            n_zero += 1
        else:
            for k in ks:
                ndcg[k].append(ndcg_at_k(s, g, k))
        corr = _correlations(s, g)
        if corr is None:
            n_no_corr += 1
        else:
            per_query.append(corr)
    all_s = np.concatenate(pooled_s) if pooled_s else np.zeros(0)
    all_g = np.concatenate(pooled_g) if pooled_g else np.zeros(0)
    pooled = _correlations(all_s, all_g)
    return GradedSummary(
        queries=n_queries,
        rated_pairs=len(all_s),
        pairs_without_embedding=n_missing,
        queries_without_clips=n_empty,
        queries_all_zero_gain=n_zero,
        ndcg={f"nDCG@{k}": _mean(ndcg[k]) for k in ks},
        spearman_pooled=pooled[0] if pooled else None,
        kendall_tau_b_pooled=pooled[1] if pooled else None,
        spearman_mean_per_query=_mean([c[0] for c in per_query]),
        kendall_tau_b_mean_per_query=_mean([c[1] for c in per_query]),
        queries_without_correlation=n_no_corr,
        mae=float(np.mean(np.abs(all_s - all_g))) if mae and len(all_s) else None,
    )


def _splits(ratings: Sequence[RatedQuery]) -> list[str]:
    return list(dict.fromkeys(q.split for q in ratings))


def _summaries(
    ratings: Sequence[RatedQuery],
    scores: Sequence[np.ndarray],
    gains: Sequence[np.ndarray],
    ks: Sequence[int],
    mae: bool = False,
) -> dict[str, GradedSummary]:
    """Per split, and "all" when there are several."""
    splits = _splits(ratings)
    out = {}
    for name in [*splits, "all"] if len(splits) > 1 else splits:
        idx = [i for i, q in enumerate(ratings) if name in ("all", q.split)]
        out[name] = _summary([scores[i] for i in idx], [gains[i] for i in idx], ks, mae)
    return out


def _per_split(value, splits: list[str], is_per_split: Callable[[object], bool], what: str) -> dict[str, object]:
    """`value` as {split: value}: given per split, or one value that then serves the only split."""
    if isinstance(value, Mapping) and value and all(is_per_split(v) for v in value.values()):
        return {s: value.get(s) for s in splits}
    if len(splits) > 1:
        raise ValueError(
            f"the ratings hold splits {', '.join(splits)} but one set of {what} was given: Clotho reuses some file "
            f"names across splits for different clips, so pass {{split: {what}}} or only the ratings of one split"
        )
    return {splits[0]: value}


def _clip_table(clip_emb: ClipEmbeddings) -> tuple[dict[str, int], np.ndarray]:
    """file_name -> row, and the unit-norm rows [N, E]."""
    if isinstance(clip_emb, tuple):
        names, matrix = clip_emb
        names = list(names)
        emb = _as_float64(matrix, "clip embeddings", 2)
        if len(names) != emb.shape[0]:
            raise ValueError(f"{len(names)} clip names for {emb.shape[0]} clip embeddings")
    else:
        names = list(clip_emb)
        if not names:
            raise ValueError("no clip embeddings given")
        emb = _as_float64(np.stack([_as_float64(clip_emb[n], f"embedding of {n}", 1) for n in names]), "clips", 2)
    index = {n: i for i, n in enumerate(names)}
    if len(index) != len(names):
        dup = next(n for i, n in enumerate(names) if index[n] != i)
        raise ValueError(f"clip {dup!r} has two embeddings; pass one per clip")
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"clip {names[int(np.argmin(norm))]!r} has a zero embedding: its cosine is undefined")
    return index, emb / norm


def model_scores(query_emb, clip_emb, ratings: Sequence[RatedQuery]) -> list[np.ndarray]:
    """Cosine of each query to each of its rated clips: [n_q] per query, NaN where the clip has no embedding.

    `query_emb` [Q, E] holds the model's text embedding of `ratings[q].query_text` in row q. `clip_emb` is one
    `ClipEmbeddings` ({file_name: [E]} or (file_names, [N, E])) when the ratings are of one split, else
    {split: ClipEmbeddings}. Raises ValueError when no rated clip has an embedding.
    """
    if not ratings:
        raise ValueError("no ratings given")
    q_emb = _as_float64(query_emb, "query_emb", 2)
    if q_emb.shape[0] != len(ratings):
        raise ValueError(f"query_emb has {q_emb.shape[0]} rows for {len(ratings)} rated queries; one per query")
    q_norm = np.linalg.norm(q_emb, axis=1, keepdims=True)
    if (q_norm == 0).any():
        raise ValueError(f"query {ratings[int(np.argmin(q_norm))].query_id!r} has a zero embedding")
    q_emb = q_emb / q_norm
    splits = _splits(ratings)
    tables = {
        s: _clip_table(v) if v is not None else ({}, np.zeros((0, q_emb.shape[1])))
        for s, v in _per_split(clip_emb, splits, lambda v: isinstance(v, (Mapping, tuple)), "clip embeddings").items()
    }
    dims = {t[1].shape[1] for t in tables.values() if len(t[1])}
    if dims and dims != {q_emb.shape[1]}:
        raise ValueError(f"query_emb has dimension {q_emb.shape[1]} but the clip embeddings have {sorted(dims)}")
    out = []
    for q, vec in zip(ratings, q_emb):
        index, emb = tables[q.split]
        out.append(np.array([emb[index[c.file_name]] @ vec if c.file_name in index else np.nan for c in q.clips]))
    matched = sum(int((~np.isnan(s)).sum()) for s in out)
    if matched == 0:
        n_pairs = sum(len(q.clips) for q in ratings)
        embedded = [n for index, _ in tables.values() for n in list(index)[:3]][:3]
        rated = list(dict.fromkeys(c.file_name for q in ratings for c in q.clips))[:3]
        raise ValueError(
            f"0 of {n_pairs} rated (query, clip) pairs have a clip among the "
            f"{sum(len(t[0]) for t in tables.values())} embedded clips (rated e.g. {rated}, embedded e.g. {embedded}); "
            "check that the ratings are of the split that was embedded (e.g. evaluation_relevances_joined.csv with "
            "the Clotho evaluation clips) and that clips are named by their file name with extension"
        )
    return out


def _embedder(embed) -> Callable[[list[str]], np.ndarray]:
    """texts -> unit-norm [n, D], from a Mapping text -> vector or a callable texts -> [n, D]."""

    def unit(vectors) -> np.ndarray:
        v = _as_float64(vectors, "Sentence-BERT vectors", 2)
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        if (norm == 0).any():
            raise ValueError("a Sentence-BERT vector is zero: its cosine is undefined")
        return v / norm

    if isinstance(embed, Mapping):

        def lookup(texts: list[str]) -> np.ndarray:
            missing = [t for t in texts if t not in embed]
            if missing:
                raise ValueError(
                    f"{len(missing)} text(s) have no precomputed Sentence-BERT vector, e.g. {missing[:2]}; embed every "
                    "query text and every caption of the rated clips"
                )
            return unit(np.stack([np.asarray(embed[t], np.float64) for t in texts]))

        return lookup
    return lambda texts: unit(embed(texts))


def target_similarity(
    ratings: Sequence[RatedQuery], captions, embed: Mapping[str, Any] | Callable[[list[str]], Any]
) -> tuple[list[np.ndarray], int]:
    """h per rated clip ([n_q] per query, aligned with `ratings[q].clips`) and how many queries were revised.

    h = mean cosine between the query text and the clip's captions, the query's own caption left out
    (`relret.calibrate.query_clip_similarity`). `captions` is {file_name: [caption, ...]} for ratings of one split,
    else {split: {file_name: [...]}}. `embed` maps each text (query texts and captions) to its Sentence-BERT vector,
    or is a callable texts -> [n, D]; vectors are normalised here. The count is of queries not verbatim among their
    clip's captions (revised since the ratings; the nearest caption is left out instead).
    """
    if not ratings:
        raise ValueError("no ratings given")
    splits = _splits(ratings)
    tables = _per_split(captions, splits, lambda v: isinstance(v, Mapping), "captions")
    embed_fn = _embedder(embed)
    out: list[np.ndarray] = [np.zeros(0)] * len(ratings)
    n_revised = 0
    for split in splits:
        if tables[split] is None:
            raise ValueError(f"no captions given for split {split!r}; pass {{split: captions}} for every rated split")
        idx = [i for i, q in enumerate(ratings) if q.split == split]
        flat = [
            Rating(split, ratings[i].query_text, ratings[i].query_file, c.file_name, c.rating)
            for i in idx
            for c in ratings[i].clips
        ]
        h, revised = query_clip_similarity(flat, tables[split], embed_fn)
        n_revised += revised
        start = 0
        for i in idx:
            out[i] = h[start : start + len(ratings[i].clips)]
            start += len(ratings[i].clips)
    return out, n_revised


def _gains(ratings: Sequence[RatedQuery]) -> list[np.ndarray]:
    return [np.array([c.rating / RATING_SCALE for c in q.clips]) for q in ratings]


def _target_g(ratings: Sequence[RatedQuery], target_h: Sequence, a: float, b: float) -> list[np.ndarray]:
    if len(target_h) != len(ratings):
        raise ValueError(f"target_h has {len(target_h)} entries for {len(ratings)} rated queries")
    out = []
    for q, h in zip(ratings, target_h):
        h = _as_float64(h, f"target_h of query {q.query_id!r}", 1)
        if len(h) != len(q.clips):
            raise ValueError(f"target_h of query {q.query_id!r} has {len(h)} values for {len(q.clips)} rated clips")
        out.append(logistic(torch.from_numpy(h), a, b).numpy())
    return out


def target_metrics(
    ratings: Sequence[RatedQuery],
    target_h: Sequence,
    a: float = PAPER_A,
    b: float = PAPER_B,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, GradedSummary]:
    """The training target g = logistic(h; a, b) scored against rating / 100 on every rated pair (with its MAE).

    `target_h` as returned by `target_similarity`. Needs no model: a baseline for what the training aims at.
    """
    g = _target_g(ratings, target_h, a, b)
    return _summaries(ratings, g, _gains(ratings), ks, mae=True)


def graded_metrics(
    query_emb,
    clip_emb,
    ratings: Sequence[RatedQuery],
    ks: Sequence[int] = DEFAULT_KS,
    target_h: Sequence | None = None,
    a: float = PAPER_A,
    b: float = PAPER_B,
) -> GradedReport:
    """Model cosine against the human ratings (see the module docstring), per split and overall.

    `query_emb` [Q, E]: the model's embedding of `ratings[q].query_text` in row q. `clip_emb`: {file_name: [E]} or
    (file_names, [N, E]) for ratings of one split, else {split: either}; clips without an embedding are skipped
    and counted. With `target_h` (from `target_similarity`), the report adds the target g = logistic(h; a, b)
    against the ratings and the model against g as gains, both over the same pairs as the model.
    Raises ValueError when no rated clip has an embedding.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    scores = model_scores(query_emb, clip_emb, ratings)
    gains = _gains(ratings)
    report = GradedReport(
        model=_summaries(ratings, scores, gains, ks),
        ks=ks,
        info={"gain": "rating / 100 (linear)", "score": "cosine of model embeddings", "ties": "lower index first"},
    )
    if target_h is not None:
        g = _target_g(ratings, target_h, a, b)
        g_on_model_pairs = [np.where(np.isnan(s), np.nan, t) for s, t in zip(scores, g)]
        report.target = _summaries(ratings, g_on_model_pairs, gains, ks, mae=True)
        report.model_vs_target = _summaries(ratings, scores, g, ks)
        report.info.update(target="g = 1 / (1 + exp(a - b h))", a=a, b=b)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Report


def _cell(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_graded(report: GradedReport) -> str:
    """Markdown table: per split, the model (and the target g, and model vs g when given) against the ratings."""
    parts = [("model vs human", report.model)]
    if report.target is not None:
        parts.append(("target g vs human", report.target))
    if report.model_vs_target is not None:
        parts.append(("model vs target g", report.model_vs_target))
    header = ["split", "scores vs gains", "queries", "pairs"] + [f"nDCG@{k}" for k in report.ks]
    header += ["Spearman (pooled)", "Kendall τb (pooled)", "Spearman (per-query mean)", "Kendall τb (per-query mean)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split in report.model:
        for title, summaries in parts:
            s = summaries[split]
            cells = [split, title, str(s.queries), str(s.rated_pairs)]
            cells += [_cell(s.ndcg[f"nDCG@{k}"]) for k in report.ks]
            correlations = (s.spearman_pooled, s.kendall_tau_b_pooled)
            correlations += (s.spearman_mean_per_query, s.kendall_tau_b_mean_per_query)
            cells += [_cell(v) for v in correlations]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    notes = []
    for split, s in report.model.items():
        notes.append(
            f"{split}: {s.pairs_without_embedding} rated pair(s) skipped (clip not embedded), "
            f"{s.queries_without_clips} query(ies) with no embedded clip, {s.queries_all_zero_gain} with all ratings 0 "
            f"(left out of nDCG), {s.queries_without_correlation} without a per-query correlation"
        )
        if report.target is not None and report.target[split].mae is not None:
            notes[-1] += f"; MAE(g, rating/100) = {report.target[split].mae:.3f}"
    lines.append("; ".join(notes) + ".")
    lines.append(
        "Gains = rating / 100; each query's rated clips ranked by score, ties by file-name order. Pooled: one "
        "correlation over all rated pairs; per-query mean: the mean of each query's correlation."
    )
    return "\n".join(lines)
