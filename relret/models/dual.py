"""The dual encoder: PaSST for audio, RoBERTa for captions, each followed by Linear-ReLU-Linear into a shared space.

    model = build_model(ModelConfig())
    audio_emb, text_emb = model(audio [B, T], audio_len [B], captions: list[str])    # [B, E], [B, E]

Embeddings are returned unnormalised: the losses normalise them, and so does `encode_*(..., normalize=True)` for
retrieval, where similarity is the cosine. The temperature is the loss's `tau` (fixed at 0.05 by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from relret.config import ModelConfig
from relret.models.audio import PaSSTEncoder
from relret.models.text import TextEncoder


class ProjectionHead(nn.Sequential):
    """Linear-ReLU-Linear: [*, in_dim] -> [*, out_dim]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, audio_encoder: PaSSTEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        hidden = cfg.proj_hidden_dim or cfg.embed_dim
        self.audio_proj = ProjectionHead(audio_encoder.output_dim, hidden, cfg.embed_dim)
        self.text_proj = ProjectionHead(text_encoder.output_dim, hidden, cfg.embed_dim)

    def encode_audio(
        self, audio: torch.Tensor, audio_len: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """[B, T] 32 kHz audio (+ [B] valid lengths) -> [B, embed_dim]."""
        emb = self.audio_proj(self.audio_encoder(audio, audio_len))
        return F.normalize(emb.float(), dim=-1) if normalize else emb

    def encode_text(self, captions: Sequence[str], normalize: bool = False) -> torch.Tensor:
        """B captions -> [B, embed_dim]."""
        emb = self.text_proj(self.text_encoder(captions))
        return F.normalize(emb.float(), dim=-1) if normalize else emb

    def forward(
        self, audio: torch.Tensor, audio_len: torch.Tensor, captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_audio(audio, audio_len), self.encode_text(captions)


def build_model(cfg: ModelConfig, text_model=None, tokenizer=None, load_audio_weights: bool = True) -> DualEncoder:
    """A DualEncoder per `cfg`. `text_model`/`tokenizer` replace loading (checkpoints carry both); with
    `load_audio_weights=False` the PaSST weights file is not read (its values are about to be overwritten)."""
    audio_cfg = cfg.audio if load_audio_weights else dataclasses.replace(cfg.audio, weights=None)
    return DualEncoder(cfg, PaSSTEncoder(audio_cfg), TextEncoder(cfg.text, text_model, tokenizer))
