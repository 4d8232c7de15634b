"""Retrieval metrics: mAP@10, R@k (DCASE convention) and hit@k (CLAP/WavCaps convention).

For one query with n relevant items and ranked list r_1, r_2, ... (ties broken by lower item index):
- R@k = (relevant items among r_1..r_k) / n. With five captions per clip, audio-to-text R@1 is at most 0.2.
- hit@k = 1 if any relevant item is among r_1..r_k, else 0.
- AP@10 = sum over the hits at positions p_i <= 10 (i-th hit) of i / p_i, divided by n. mAP@10 is its mean.

Every metric needs only the top max(ks, map_k) items and n, so queries are processed in chunks and neither the
full score matrix (when starting from embeddings) nor a full sort is ever built. One implementation serves both
entry points: from a score matrix with a relevance matrix, and from embeddings with labels (relevant when equal).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

MetricDict = dict[str, float]


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, k] indices of the k highest scores per row, best first; equal scores ordered by lower index."""
    n = scores.shape[1]
    k = min(k, n)
    threshold = scores.topk(k, dim=1).values[:, -1:]
    greater = scores > threshold
    equal = scores == threshold
    # Of the items tied at the threshold keep the lowest indices, as many as the top k still has room for.
    room = k - greater.sum(dim=1, keepdim=True)
    chosen = greater | (equal & (equal.cumsum(dim=1) <= room))
    idx = chosen.nonzero()[:, 1].view(scores.shape[0], k)  # ascending item index within each row
    order = torch.sort(scores.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def metrics_from_hits(
    hits: torch.Tensor, n_relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10), map_k: int = 10
) -> dict[str, torch.Tensor]:
    """Per-query metrics from `hits` [Q, K] (is the item at rank p relevant, p = 1..K) and `n_relevant` [Q]."""
    hits = hits.double()  # [Q, K] is small; float64 keeps i/p and 1/n exact to the last digit
    n_rel = n_relevant.to(hits.dtype)
    if (n_rel <= 0).any():
        bad = (n_rel <= 0).nonzero()[0].item()
        raise ValueError(f"query {bad} has no relevant item: its recall and AP are undefined")
    out: dict[str, torch.Tensor] = {}
    cum = hits.cumsum(dim=1)
    for k in ks:
        found = cum[:, min(k, hits.shape[1]) - 1]
        out[f"R@{k}"] = found / n_rel
        out[f"hit@{k}"] = (found > 0).to(hits.dtype)
    top = hits[:, :map_k]
    positions = torch.arange(1, top.shape[1] + 1, dtype=hits.dtype, device=hits.device)
    out[f"AP@{map_k}"] = (top * cum[:, :map_k] / positions).sum(dim=1) / n_rel
    return out


def _check_scores(scores, name: str = "scores") -> torch.Tensor:
    t = torch.as_tensor(scores)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [Q, N] matrix, got shape {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf; rankings would be arbitrary")
    return t


def _chunks(n: int, size: int) -> Iterator[slice]:
    if size <= 0:
        raise ValueError(f"chunk_size must be positive, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _collect(parts: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    return {key: torch.cat([p[key] for p in parts]).double().cpu().numpy() for key in parts[0]}


def summarize(per_query: dict[str, np.ndarray]) -> MetricDict:
    """Mean over queries; per-query "AP@k" becomes "mAP@k"."""
    return {(f"m{key}" if key.startswith("AP@") else key): float(np.mean(v)) for key, v in per_query.items()}


def per_query_metrics(
    scores: torch.Tensor | np.ndarray,
    relevant: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    chunk_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Per-query R@k, hit@k and AP@map_k as float64 arrays [Q], from `scores` [Q, N] and boolean `relevant` [Q, N]."""
    s = _check_scores(scores)
    rel = torch.as_tensor(relevant)
    if rel.shape != s.shape:
        raise ValueError(f"relevant {tuple(rel.shape)} must have the shape of scores {tuple(s.shape)}")
    if rel.dtype != torch.bool:
        if rel.is_floating_point() or not ((rel == 0) | (rel == 1)).all():
            raise ValueError("relevant must be boolean (or integers 0/1)")
        rel = rel.bool()
    rel = rel.to(s.device)
    depth = max(max(ks), map_k)
    parts = []
    for rows in _chunks(s.shape[0], chunk_size):
        idx = topk_indices(s[rows], depth)
        parts.append(metrics_from_hits(rel[rows].gather(1, idx), rel[rows].sum(dim=1), ks, map_k))
    return _collect(parts)


def retrieval_metrics(
    scores: torch.Tensor | np.ndarray,
    relevant: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    chunk_size: int = 1024,
) -> MetricDict:
    """{"R@1", "R@5", "R@10", "hit@1", "hit@5", "hit@10", "mAP@10"} as fractions in [0, 1].

    `scores` [Q, N] (higher is better), `relevant` [Q, N] boolean; numpy or torch. Per-query values:
    `per_query_metrics`.
    """
    return summarize(per_query_metrics(scores, relevant, ks, map_k, chunk_size))


def per_query_metrics_from_embeddings(
    query_emb: torch.Tensor | np.ndarray,
    item_emb: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    item_labels: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    chunk_size: int = 1024,
) -> dict[str, np.ndarray]:
    """As `per_query_metrics` with scores = query_emb [Q, E] @ item_emb [N, E].T computed chunk by chunk, and item n
    relevant to query q when item_labels[n] == query_labels[q] (integer labels such as clip ids). Memory is
    O(chunk_size x N), so 100k x 100k runs without the full matrix."""
    q = _check_scores(query_emb, "query_emb")
    items = _check_scores(item_emb, "item_emb").to(q.device, q.dtype)
    if q.shape[1] != items.shape[1]:
        raise ValueError(f"query_emb has dimension {q.shape[1]} but item_emb has {items.shape[1]}")
    q_lab = torch.as_tensor(query_labels).to(q.device)
    i_lab = torch.as_tensor(item_labels).to(q.device)
    if q_lab.shape != (q.shape[0],) or i_lab.shape != (items.shape[0],):
        raise ValueError(
            f"labels must be [Q]={q.shape[0]} and [N]={items.shape[0]}, got {tuple(q_lab.shape)}, {tuple(i_lab.shape)}"
        )
    uniq, counts = torch.unique(i_lab, return_counts=True)
    pos = torch.searchsorted(uniq, q_lab).clamp_max(len(uniq) - 1)
    n_relevant = torch.where(uniq[pos] == q_lab, counts[pos], torch.zeros_like(counts[pos]))
    depth = max(max(ks), map_k)
    parts = []
    for rows in _chunks(q.shape[0], chunk_size):
        idx = topk_indices(q[rows] @ items.T, depth)
        parts.append(metrics_from_hits(i_lab[idx] == q_lab[rows, None], n_relevant[rows], ks, map_k))
    return _collect(parts)


def retrieval_metrics_from_embeddings(
    query_emb: torch.Tensor | np.ndarray,
    item_emb: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    item_labels: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    chunk_size: int = 1024,
) -> MetricDict:
    """Mean metrics of `per_query_metrics_from_embeddings`."""
    return summarize(
        per_query_metrics_from_embeddings(query_emb, item_emb, query_labels, item_labels, ks, map_k, chunk_size)
    )
