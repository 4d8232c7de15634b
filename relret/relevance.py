"""Target relevance of clips to captions from Sentence-BERT similarities between captions (Xie et al., eq. 1).

The relevance of clip y_j to caption x_i is g = f(h), h the cosine similarity between the Sentence-BERT embeddings of
x_i and of the caption annotated for y_j. The paper's f is the logistic 1/(1+exp(a - b h)) with a = 2.73, b = 4.58,
fitted by beta regression to crowdsourced ratings (refit for another Sentence-BERT model with `relret calibrate`).

The relevance functions f are registered by name in `relret.config.RELEVANCE_FNS` (the one list of their names);
each takes (h [Q, N], RelevanceConfig, positives [Q, N] or None) and returns g [Q, N].

Shapes: Q queries (captions), N clips, D the Sentence-BERT dimension, C captions per clip.
"""

from __future__ import annotations

import typing

import numpy as np
import torch

from relret.config import RELEVANCE_FNS, RelevanceConfig

Aggregate = typing.Literal["paired", "mean", "max"]
AGGREGATES: tuple[str, ...] = typing.get_args(typing.get_type_hints(RelevanceConfig)["aggregate"])
PAPER_A = RelevanceConfig.a
PAPER_B = RelevanceConfig.b


def as_tensor(x: torch.Tensor | np.ndarray, name: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """`x` as a floating tensor of the given rank(s), refusing empty or non-finite input with the tensor's name."""
    t = torch.as_tensor(x)
    if not torch.is_floating_point(t):
        t = t.float()
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # shards store Sentence-BERT vectors as float16; compute in float32
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): an empty batch has no ranking to learn")
    # max and min propagate NaN and inf: two reductions, no [*, *] boolean temporary on the hot path.
    if not (torch.isfinite(t.max()) and torch.isfinite(t.min())):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name} holds NaN or inf (first at index {bad}); check the embeddings that produced it")
    return t


def l2_normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit norm along the last dimension; a zero-norm row is refused (its cosine is undefined)."""
    norm = x.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        bad = (norm.squeeze(-1) == 0).nonzero()[0].tolist()
        raise ValueError(f"{name} has a zero-norm vector at index {bad}: cosine similarity is undefined for it")
    return x / norm


def logistic(h: torch.Tensor | np.ndarray | float, a: float = PAPER_A, b: float = PAPER_B) -> torch.Tensor:
    """g = 1 / (1 + exp(a - b h)), elementwise."""
    h = torch.as_tensor(h, dtype=torch.get_default_dtype()) if not torch.is_tensor(h) else h
    return torch.sigmoid(b * h - a)


def caption_similarity(
    query_sbert: torch.Tensor | np.ndarray,
    clip_sbert: torch.Tensor | np.ndarray,
    aggregate: Aggregate = "paired",
    caption_mask: torch.Tensor | np.ndarray | None = None,
    paired_index: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """h [Q, N]: cosine similarity of each query caption to each clip's caption(s).

    `clip_sbert` is [N, D] (the caption paired with each clip; `aggregate` must be "paired") or [N, C, D] with a
    boolean `caption_mask` [N, C] marking real captions: "mean"/"max" aggregate over them, "paired" takes caption
    `paired_index[n]` of clip n.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")
    q = l2_normalize(as_tensor(query_sbert, "query_sbert", 2), "query_sbert")
    c = as_tensor(clip_sbert, "clip_sbert", (2, 3))
    if c.shape[-1] != q.shape[-1]:
        raise ValueError(f"query_sbert has dimension {q.shape[-1]} but clip_sbert has {c.shape[-1]}")
    if c.dim() == 2:
        if aggregate != "paired":
            raise ValueError(f"aggregate={aggregate!r} needs every caption of each clip: clip_sbert [N, C, D] + mask")
        return q @ l2_normalize(c, "clip_sbert").T
    n, n_cap, _ = c.shape
    if aggregate == "paired":
        if paired_index is None:
            raise ValueError("aggregate='paired' with clip_sbert [N, C, D] needs paired_index [N]: which caption pairs")
        idx = torch.as_tensor(paired_index).long()
        if idx.shape != (n,) or (idx < 0).any() or (idx >= n_cap).any():
            raise ValueError(f"paired_index must be [N]={n} integers in [0, {n_cap}), got {idx.tolist()}")
        if caption_mask is not None and not torch.as_tensor(caption_mask).bool()[torch.arange(n), idx].all():
            raise ValueError("paired_index points at a masked-out (padding) caption")
        return q @ l2_normalize(c[torch.arange(n), idx], "clip_sbert").T
    if caption_mask is None:
        mask = torch.ones(n, n_cap, dtype=torch.bool)
    else:
        mask = torch.as_tensor(caption_mask).bool()
        if mask.shape != (n, n_cap):
            raise ValueError(f"caption_mask must have shape {(n, n_cap)}, got {tuple(mask.shape)}")
    if not mask.any(dim=1).all():
        bad = (~mask.any(dim=1)).nonzero()[0].item()
        raise ValueError(f"clip {bad} has no caption in caption_mask: its relevance is undefined")
    c = torch.where(mask.unsqueeze(-1), c, torch.ones_like(c))  # padding rows only need a non-zero norm
    sims = torch.einsum("qd,ncd->qnc", q, l2_normalize(c, "clip_sbert"))  # [Q, N, C]
    if aggregate == "mean":
        return (sims * mask).sum(-1) / mask.sum(-1)
    return sims.masked_fill(~mask, float("-inf")).amax(-1)


def logistic_relevance(h: torch.Tensor, cfg: RelevanceConfig, positives: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's f: 1 / (1 + exp(a - b h))."""
    return logistic(h, cfg.a, cfg.b)


def minmax_relevance(h: torch.Tensor, cfg: RelevanceConfig, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Each row scaled to [0, 1] by its own min and max; a row with no spread gets zeros (a uniform target)."""
    lo = h.amin(dim=1, keepdim=True)
    spread = h.amax(dim=1, keepdim=True) - lo
    return torch.where(spread > 0, (h - lo) / spread.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))


def binary_relevance(h: torch.Tensor, cfg: RelevanceConfig, positives: torch.Tensor | None = None) -> torch.Tensor:
    """1 where `positives` [Q, N] is true (the query's own clip), else 0; every row needs at least one positive."""
    if positives is None:
        raise ValueError("fn='binary' needs `positives` [Q, N]: which clips belong to each query's caption")
    pos = torch.as_tensor(positives, device=h.device).bool()
    if pos.shape != h.shape:
        raise ValueError(f"positives must have shape {tuple(h.shape)}, got {tuple(pos.shape)}")
    empty = ~pos.any(dim=1)
    if empty.any():
        raise ValueError(
            f"relevance row {empty.nonzero()[0].item()} has no relevant clip with fn='binary' (all zeros): "
            "the query's own clip must be among the candidates"
        )
    return pos.to(h.dtype)


def relevance_from_similarity(
    h: torch.Tensor,
    fn: str = "logistic",
    a: float = PAPER_A,
    b: float = PAPER_B,
    positives: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """g [Q, N] from h [Q, N] by the registered relevance function `fn`; each row is one query's ranked list.

    logistic: f(h) as in the paper. minmax: each row scaled to [0, 1] by its own min and max (a row with no spread
    gets zeros, i.e. a uniform target). binary: 1 where `positives` [Q, N] is true (the query's own clip), else 0;
    every row needs at least one positive.
    """
    _check_fn(fn)
    return apply_relevance(h, RelevanceConfig(fn=fn, a=a, b=b), positives)


def _check_fn(fn: str) -> None:
    if fn not in RELEVANCE_FNS:
        raise ValueError(f"unknown relevance fn {fn!r}; expected one of {', '.join(RELEVANCE_FNS.names())}")


def apply_relevance(
    h: torch.Tensor, cfg: RelevanceConfig, positives: torch.Tensor | np.ndarray | None = None
) -> torch.Tensor:
    """g [Q, N] = cfg.fn(h) with the function's options from `cfg` (a resolved RelevanceConfig)."""
    return RELEVANCE_FNS.get(cfg.fn)(h, cfg, positives)


def relevance_matrix(
    query_sbert: torch.Tensor | np.ndarray,
    clip_sbert: torch.Tensor | np.ndarray,
    fn: str = "logistic",
    *,
    a: float = PAPER_A,
    b: float = PAPER_B,
    aggregate: Aggregate = "paired",
    caption_mask: torch.Tensor | np.ndarray | None = None,
    paired_index: torch.Tensor | np.ndarray | None = None,
    positives: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """g [Q, N] = f(h), the target relevance of each clip to each query caption.

    `query_sbert` [Q, D]; `clip_sbert` [N, D] (paired caption) or [N, C, D] with `caption_mask` [N, C] (see
    `caption_similarity`). `positives` [Q, N] (bool) is required by fn="binary" only.
    """
    _check_fn(fn)
    h = caption_similarity(query_sbert, clip_sbert, aggregate, caption_mask, paired_index)
    return relevance_from_similarity(h, fn, a, b, positives)
