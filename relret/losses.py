"""ListNet (Xie et al., eq. 2-4) and the InfoNCE baseline over the global batch.

Both modules follow open_clip's ClipLoss: `get_logits`, `get_targets`, `forward`. Called as

    out = loss_fn(audio_emb [B, E], text_emb [B, E], caption_sbert [B, D], clip_ids [B])
    out["loss"].backward()

Row i of a batch is clip i with one of its captions (caption i). Embeddings are L2-normalised here, so logits are
cosine similarities over tau. Across ranks, audio and text embeddings are gathered with autograd, Sentence-BERT
vectors and clip ids without; with `local_loss` each rank scores its own rows against all columns. The mean of the
ranks' losses equals the loss of one process on the concatenated batch, and under data-parallel gradient averaging
(DeepSpeed, DDP) the parameter gradients equal that process's gradients, for every combination of options except
local_loss=True with gather_with_grad=False, which drops the terms through other ranks' rows (open_clip's cheap mode).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from relret import distributed
from relret.config import LossConfig, RelevanceConfig
from relret.relevance import as_tensor, caption_similarity, l2_normalize, relevance_from_similarity

Direction = Literal["t2a", "a2t", "both"]
DIRECTIONS: tuple[str, ...] = ("t2a", "a2t", "both")


def listnet_loss(
    similarity: torch.Tensor | np.ndarray,
    relevance: torch.Tensor | np.ndarray,
    tau: float = 0.05,
    omega: float = 0.05,
) -> torch.Tensor:
    """Mean over rows of -sum_j p_j log q_j with p = softmax(relevance / omega), q = softmax(similarity / tau).

    `similarity` [Q, N] (cosine similarities of each query to its candidates), `relevance` [Q, N] (targets g).
    """
    s = as_tensor(similarity, "similarity", 2)
    g = as_tensor(relevance, "relevance", 2)
    if s.shape != g.shape:
        raise ValueError(f"similarity {tuple(s.shape)} and relevance {tuple(g.shape)} must have the same shape")
    if not (tau > 0 and omega > 0):
        raise ValueError(f"tau and omega must be > 0, got tau={tau}, omega={omega}")
    return _soft_cross_entropy(s / tau, torch.softmax(g / omega, dim=1))


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` unchanged in value, its gradient multiplied by `scale`."""
    return x * scale - x.detach() * (scale - 1.0)


class _GlobalBatchLoss(nn.Module):
    """Validation, normalisation, gathering and direction handling shared by the two losses."""

    def __init__(
        self,
        direction: Direction,
        tau: float,
        local_loss: bool,
        gather_with_grad: bool,
    ) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.direction = direction
        self.tau = tau
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    # -- inputs ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _check(audio_emb, text_emb, caption_sbert, clip_ids):
        audio = as_tensor(audio_emb, "audio_emb", 2)
        text = as_tensor(text_emb, "text_emb", 2)
        sbert = as_tensor(caption_sbert, "caption_sbert", 2)
        ids = torch.as_tensor(clip_ids)
        if audio.shape != text.shape:
            raise ValueError(
                f"audio_emb {tuple(audio.shape)} and text_emb {tuple(text.shape)} must have the same shape"
            )
        if sbert.shape[0] != audio.shape[0]:
            raise ValueError(f"caption_sbert has {sbert.shape[0]} rows but the batch has {audio.shape[0]}")
        if ids.shape != (audio.shape[0],) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"clip_ids must be [B]={audio.shape[0]} integers, got {ids.dtype} {tuple(ids.shape)}")
        return audio, text, sbert.to(audio.device), ids.to(audio.device)

    def _gather(self, audio, text, sbert, ids):
        sizes = distributed.gather_sizes(audio.shape[0], audio.device)
        rank = distributed.get_rank()
        all_audio = distributed.all_gather_cat(audio, self.gather_with_grad, sizes)
        all_text = distributed.all_gather_cat(text, self.gather_with_grad, sizes)
        all_sbert = distributed.all_gather_cat(sbert, False, sizes)
        all_ids = distributed.all_gather_cat(ids, False, sizes)
        if self.local_loss:
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        else:
            rows = slice(0, sum(sizes))
        return all_audio, all_text, all_sbert, all_ids, rows

    # -- the ClipLoss-style interface ------------------------------------------------------------------------------
    def get_logits(self, all_audio: torch.Tensor, all_text: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        """Logits per direction: "t2a" [R, N] text rows against all clips, "a2t" [R, N] clip rows against all texts."""
        out = {}
        full = rows.start == 0 and rows.stop == all_audio.shape[0]
        if self.direction in ("t2a", "both"):
            out["t2a"] = all_text[rows] @ all_audio.T / self.tau
        if self.direction in ("a2t", "both"):
            # With every row present, the a2t logits are the transpose of the t2a ones: one matmul, not two.
            out["a2t"] = out["t2a"].T if full and "t2a" in out else all_audio[rows] @ all_text.T / self.tau
        return out

    def get_targets(self, directions, all_sbert, all_ids, rows, **extra) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(
        self,
        audio_emb: torch.Tensor,
        text_emb: torch.Tensor,
        caption_sbert: torch.Tensor,
        clip_ids: torch.Tensor,
        **extra: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        audio, text, sbert, ids = self._check(audio_emb, text_emb, caption_sbert, clip_ids)
        audio = l2_normalize(audio, "audio_emb")
        text = l2_normalize(text, "text_emb")
        all_audio, all_text, all_sbert, all_ids, rows = self._gather(audio, text, sbert, ids)
        logits = self.get_logits(all_audio, all_text, rows)
        with torch.no_grad():
            targets = self.get_targets(tuple(logits), all_sbert, all_ids, rows, **extra)
        out = {f"loss_{d}": _soft_cross_entropy(logits[d], targets[d].to(logits[d].dtype)) for d in logits}
        loss = torch.stack(list(out.values())).mean()
        world = distributed.get_world_size()
        if world > 1 and not self.local_loss and not self.gather_with_grad:
            # Every rank computes the whole loss but gradients reach only its own rows; data-parallel averaging then
            # divides by the world size once too often.
            loss = _scale_grad(loss, float(world))
        out["loss"] = loss
        return out


class ListNetLoss(_GlobalBatchLoss):
    """ListNet: cross-entropy between softmax(g / omega) and softmax(cos / tau), g from caption similarities.

    Optional keyword inputs for the "mean"/"max" relevance aggregates: `clip_sbert` [B, C, D] (every caption of each
    clip) and `caption_mask` [B, C].
    """

    def __init__(
        self,
        direction: Direction = "t2a",
        tau: float = 0.05,
        omega: float = 0.05,
        relevance: RelevanceConfig | None = None,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__(direction, tau, local_loss, gather_with_grad)
        if not omega > 0:
            raise ValueError(f"omega must be > 0, got {omega}")
        self.omega = omega
        self.relevance = (relevance or RelevanceConfig()).resolved()

    def _similarity(self, direction, all_sbert, rows, clip_sbert, caption_mask):
        """h [R, N] for one direction (rows are captions for t2a, clips for a2t)."""
        agg = self.relevance.aggregate
        if agg == "paired":
            # cos(x_i, x_j) is symmetric, so both directions take the same form.
            return all_sbert[rows] @ all_sbert.T
        if clip_sbert is None:
            raise ValueError(f"relevance.aggregate={agg!r} needs clip_sbert [B, C, D] and caption_mask [B, C]")
        if direction == "t2a":
            return caption_similarity(all_sbert[rows], clip_sbert, agg, caption_mask)
        return caption_similarity(all_sbert, clip_sbert[rows], agg, caption_mask[rows]).T

    def get_targets(self, directions, all_sbert, all_ids, rows, clip_sbert=None, caption_mask=None):
        all_sbert = l2_normalize(all_sbert, "caption_sbert")
        if clip_sbert is not None:
            clip_sbert = distributed.all_gather_cat(as_tensor(clip_sbert, "clip_sbert", 3).to(all_sbert.device), False)
            mask = torch.ones(clip_sbert.shape[:2], dtype=torch.bool) if caption_mask is None else caption_mask
            caption_mask = distributed.all_gather_cat(torch.as_tensor(mask).to(all_sbert.device), False)
        positives = all_ids[rows, None] == all_ids[None, :] if self.relevance.fn == "binary" else None
        out, cache = {}, {}
        for d in directions:
            key = d if self.relevance.aggregate != "paired" else "paired"
            if key not in cache:
                h = self._similarity(d, all_sbert, rows, clip_sbert, caption_mask)
                g = relevance_from_similarity(h, self.relevance.fn, self.relevance.a, self.relevance.b, positives)
                cache[key] = torch.softmax(g.div_(self.omega), dim=1)  # g is a temporary: divide in place
            out[d] = cache[key]
        return out


class InfoNCELoss(_GlobalBatchLoss):
    """InfoNCE (the binary baseline): the target spreads evenly over the row's positives, i.e. the columns with the
    same clip id (captions of one clip are co-positives when a clip occurs twice in the global batch)."""

    def __init__(
        self,
        direction: Direction = "both",
        tau: float = 0.05,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__(direction, tau, local_loss, gather_with_grad)

    def get_targets(self, directions, all_sbert, all_ids, rows, **extra):
        positives = (all_ids[rows, None] == all_ids[None, :]).float()
        target = positives / positives.sum(dim=1, keepdim=True)
        return {d: target for d in directions}


def build_loss(cfg: LossConfig) -> _GlobalBatchLoss:
    """The loss module a `LossConfig` describes."""
    if cfg.name == "listnet":
        return ListNetLoss(cfg.direction, cfg.tau, cfg.omega, cfg.relevance, cfg.local_loss, cfg.gather_with_grad)
    if cfg.name == "infonce":
        return InfoNCELoss(cfg.direction, cfg.tau, cfg.local_loss, cfg.gather_with_grad)
    raise ValueError(f"unknown loss {cfg.name!r}; expected listnet or infonce")
