"""ListNet (Xie et al., eq. 2-4) and the InfoNCE baseline over the global batch.

Every loss is a `GlobalBatchLoss` (open_clip's ClipLoss shape: `get_logits`, `get_targets`, `forward`), registered
by name with its config section in `relret.config.LOSSES`, and built from a config by `build_loss`. Called as

    out = loss_fn(audio_emb [B, E], text_emb [B, E], caption_sbert [B, D], clip_ids [B])
    out["loss"].backward()          # out = {"loss", **parts}: the training loop logs whatever parts it gets

The base owns what every global-batch loss needs: input checks, normalisation, the gather across ranks, the local
rows, the gradient scale of the cheap mode, and the soft cross-entropy per direction. A subclass provides the targets
(`get_targets`), or a whole different objective from the gathered batch (`compute`), and names the per-sample batch
fields it needs (`inputs`, gathered without gradient and passed to it by name).

Row i of a batch is clip i with one of its captions (caption i). Embeddings are L2-normalised here, so logits are
cosine similarities over tau. Across ranks, audio and text embeddings are gathered with autograd, Sentence-BERT
vectors and clip ids without; with `local_loss` each rank scores its own rows against all columns. The mean of the
ranks' losses equals the loss of one process on the concatenated batch, and under data-parallel gradient averaging
(DeepSpeed, DDP) the parameter gradients equal that process's gradients, for every combination of options except
local_loss=True with gather_with_grad=False, which drops the terms through other ranks' rows (open_clip's cheap mode).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from relret import distributed
from relret.config import LOSSES, LossConfig, RelevanceConfig
from relret.relevance import apply_relevance, as_tensor, caption_similarity, l2_normalize
from relret.target_stats import target_diagnostics

Direction = typing.Literal["t2a", "a2t", "both"]
DIRECTIONS: tuple[str, ...] = typing.get_args(typing.get_type_hints(LossConfig)["direction"])


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


@dataclasses.dataclass
class GatheredBatch:
    """The global batch as one rank's loss sees it. Row i of every tensor is sample i of the global batch (ranks in
    order); this rank's loss covers `rows` (its own samples with local_loss, else all)."""

    audio: torch.Tensor
    """[N, E] unit-norm audio embeddings (with gradient where gathered with it)."""
    text: torch.Tensor
    """[N, E] unit-norm text embeddings."""
    inputs: dict[str, torch.Tensor]
    """The loss's declared per-sample inputs, gathered without gradient: name -> [N, ...]."""
    rows: slice
    """This rank's rows of the loss."""


class GlobalBatchLoss(nn.Module):
    """A loss over the global batch gathered from every rank (see the module docstring).

    Subclasses set `inputs` (the batch fields they need besides the embeddings; `clip_ids` is always there) and
    implement `get_targets` (a soft cross-entropy per direction follows) or override `compute`. `graded_targets`
    marks losses whose targets are worth watching per step (`report_targets` adds `target_diagnostics` to the output
    for them)."""

    inputs: tuple[str, ...] = ("caption_sbert", "clip_ids")
    """Per-sample inputs of `forward`, in its positional order after the two embeddings."""
    optional_inputs: tuple[str, ...] = ()
    """Inputs passed only when present (keyword arguments of `forward`)."""
    gathered_inputs: tuple[str, ...] | None = None
    """The inputs `get_targets` reads, the only ones gathered from the other ranks (None: every input)."""
    graded_targets: bool = False

    def __init__(self, direction: Direction, tau: float, local_loss: bool, gather_with_grad: bool) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.direction = direction
        self.tau = tau
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.report_targets = False

    def batch_inputs(self, batch) -> dict[str, torch.Tensor]:
        """The fields of `batch` (a relret.data.Batch) this loss takes, by name."""
        names = (*self.inputs, *self.needed_optional_inputs())
        return {name: getattr(batch, name) for name in names}

    def needed_optional_inputs(self) -> tuple[str, ...]:
        """Which optional inputs this configuration uses (all by default)."""
        return self.optional_inputs

    # -- inputs ----------------------------------------------------------------------------------------------------
    def _check(self, audio_emb, text_emb, inputs: Mapping[str, torch.Tensor]):
        audio = as_tensor(audio_emb, "audio_emb", 2)
        text = as_tensor(text_emb, "text_emb", 2)
        if audio.shape != text.shape:
            raise ValueError(
                f"audio_emb {tuple(audio.shape)} and text_emb {tuple(text.shape)} must have the same shape"
            )
        checked = {}
        for name, value in inputs.items():
            if value is None:
                continue
            if name == "clip_ids":
                ids = torch.as_tensor(value)
                if ids.shape != (audio.shape[0],) or ids.is_floating_point() or ids.dtype == torch.bool:
                    raise ValueError(
                        f"clip_ids must be [B]={audio.shape[0]} integers, got {ids.dtype} {tuple(ids.shape)}"
                    )
                checked[name] = ids.to(audio.device)
                continue
            t = torch.as_tensor(value)
            if t.dtype != torch.bool:
                t = as_tensor(t, name, (1, 2, 3))
            if t.shape[0] != audio.shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} rows but the batch has {audio.shape[0]}")
            checked[name] = t.to(audio.device)
        return audio, text, checked

    def _gather(self, audio, text, inputs) -> GatheredBatch:
        sizes = distributed.gather_sizes(audio.shape[0], audio.device)
        rank = distributed.get_rank()
        all_audio = distributed.all_gather_cat(audio, self.gather_with_grad, sizes)
        all_text = distributed.all_gather_cat(text, self.gather_with_grad, sizes)
        gathered = {
            name: distributed.all_gather_cat(t, False, sizes)
            for name, t in inputs.items()
            if self.gathered_inputs is None or name in self.gathered_inputs
        }
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1])) if self.local_loss else slice(0, sum(sizes))
        return GatheredBatch(all_audio, all_text, gathered, rows)

    # -- the ClipLoss-style interface ------------------------------------------------------------------------------
    def get_logits(self, batch: GatheredBatch) -> dict[str, torch.Tensor]:
        """Logits per direction: "t2a" [R, N] text rows against all clips, "a2t" [R, N] clip rows against all texts."""
        out = {}
        rows, all_audio, all_text = batch.rows, batch.audio, batch.text
        full = rows.start == 0 and rows.stop == all_audio.shape[0]
        if self.direction in ("t2a", "both"):
            out["t2a"] = all_text[rows] @ all_audio.T / self.tau
        if self.direction in ("a2t", "both"):
            # With every row present, the a2t logits are the transpose of the t2a ones: one matmul, not two.
            out["a2t"] = out["t2a"].T if full and "t2a" in out else all_audio[rows] @ all_text.T / self.tau
        return out

    def get_targets(self, directions: tuple[str, ...], batch: GatheredBatch) -> dict[str, torch.Tensor]:
        """Target distributions per direction, [R, N] rows summing to 1 (computed without gradient)."""
        raise NotImplementedError

    def compute(self, batch: GatheredBatch) -> dict[str, torch.Tensor]:
        """{"loss", **parts} from the gathered batch: the soft cross-entropy of each direction against its targets,
        averaged over the directions (parts "loss_t2a"/"loss_a2t")."""
        logits = self.get_logits(batch)
        with torch.no_grad():
            targets = self.get_targets(tuple(logits), batch)
        out = {f"loss_{d}": _soft_cross_entropy(logits[d], targets[d].to(logits[d].dtype)) for d in logits}
        loss = torch.stack(list(out.values())).mean()
        if self.report_targets:
            first = next(iter(targets))
            own = torch.arange(batch.rows.start, batch.rows.stop, device=batch.audio.device)
            out.update(target_diagnostics(targets[first].double(), own))
        out["loss"] = loss
        return out

    def forward(self, audio_emb: torch.Tensor, text_emb: torch.Tensor, *args, **kwargs) -> dict[str, torch.Tensor]:
        """audio_emb [B, E], text_emb [B, E], then the declared `inputs` (positionally or by name) and any optional
        inputs by name -> {"loss", **parts}."""
        names = (*self.inputs, *self.optional_inputs)
        if len(args) > len(self.inputs):
            raise TypeError(
                f"{type(self).__name__} takes {len(self.inputs)} inputs after the embeddings: {self.inputs}"
            )
        given = dict(zip(self.inputs, args))
        unknown = set(kwargs) - set(names)
        if unknown or set(given) & set(kwargs):
            raise TypeError(f"{type(self).__name__} takes the inputs {names}, got {sorted({*given, *kwargs})}")
        given.update(kwargs)
        missing = [n for n in self.inputs if n not in given]
        if missing:
            raise TypeError(f"{type(self).__name__} needs the inputs {missing}")
        audio, text, inputs = self._check(audio_emb, text_emb, given)
        audio = l2_normalize(audio, "audio_emb")
        text = l2_normalize(text, "text_emb")
        out = self.compute(self._gather(audio, text, inputs))
        world = distributed.get_world_size()
        if world > 1 and not self.local_loss and not self.gather_with_grad:
            # Every rank computes the whole loss but gradients reach only its own rows; data-parallel averaging then
            # divides by the world size once too often.
            out["loss"] = _scale_grad(out["loss"], float(world))
        return out


class ListNetLoss(GlobalBatchLoss):
    """ListNet: cross-entropy between softmax(g / omega) and softmax(cos / tau), g from caption similarities.

    Optional keyword inputs for the "mean"/"max" relevance aggregates: `clip_sbert` [B, C, D] (every caption of each
    clip) and `caption_mask` [B, C].
    """

    inputs = ("caption_sbert", "clip_ids")
    optional_inputs = ("clip_sbert", "caption_mask")
    graded_targets = True

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

    @classmethod
    def from_config(cls, cfg: LossConfig) -> ListNetLoss:
        o = cfg.options
        return cls(cfg.direction, cfg.tau, o.omega, o.relevance, cfg.local_loss, cfg.gather_with_grad)

    def needed_optional_inputs(self) -> tuple[str, ...]:
        return () if self.relevance.aggregate == "paired" else self.optional_inputs

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

    def get_targets(self, directions, batch):
        rows, all_ids = batch.rows, batch.inputs["clip_ids"]
        all_sbert = l2_normalize(batch.inputs["caption_sbert"], "caption_sbert")
        clip_sbert, caption_mask = batch.inputs.get("clip_sbert"), batch.inputs.get("caption_mask")
        if clip_sbert is not None and caption_mask is None:
            caption_mask = torch.ones(clip_sbert.shape[:2], dtype=torch.bool, device=clip_sbert.device)
        positives = all_ids[rows, None] == all_ids[None, :] if self.relevance.fn == "binary" else None
        out, cache = {}, {}
        for d in directions:
            key = d if self.relevance.aggregate != "paired" else "paired"
            if key not in cache:
                h = self._similarity(d, all_sbert, rows, clip_sbert, caption_mask)
                g = apply_relevance(h, self.relevance, positives)
                cache[key] = torch.softmax(g.div_(self.omega), dim=1)  # g is a temporary: divide in place
            out[d] = cache[key]
        return out


class InfoNCELoss(GlobalBatchLoss):
    """InfoNCE (the binary baseline): the target spreads evenly over the row's positives, i.e. the columns with the
    same clip id (captions of one clip are co-positives when a clip occurs twice in the global batch)."""

    inputs = ("caption_sbert", "clip_ids")
    gathered_inputs = ("clip_ids",)  # its targets need no Sentence-BERT vector: 3,072 B per sample not sent

    def __init__(
        self,
        direction: Direction = "both",
        tau: float = 0.05,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__(direction, tau, local_loss, gather_with_grad)

    @classmethod
    def from_config(cls, cfg: LossConfig) -> InfoNCELoss:
        return cls(cfg.direction, cfg.tau, cfg.local_loss, cfg.gather_with_grad)

    def get_targets(self, directions, batch):
        all_ids = batch.inputs["clip_ids"]
        positives = (all_ids[batch.rows, None] == all_ids[None, :]).float()
        target = positives / positives.sum(dim=1, keepdim=True)
        return {d: target for d in directions}


def build_loss(cfg: LossConfig) -> GlobalBatchLoss:
    """The registered loss `cfg.name`, built from its config (`from_config(cfg)`, the loss's own section being
    `cfg.options`)."""
    return LOSSES.get(cfg.name).from_config(cfg)
