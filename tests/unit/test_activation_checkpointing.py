"""Activation checkpointing of the encoders (model.audio/text.activation_checkpointing): the same training step, and
really on (each block recomputed in backward)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from relret.config import AudioEncoderConfig, LossConfig, ModelConfig, TextEncoderConfig, TrainConfig, load_config
from relret.losses import build_loss
from relret.models import build_model

SR = 32_000
# Dropout off everywhere (PaSST's drop rates default to 0), so the two runs draw no random masks to compare.
AUDIO = AudioEncoderConfig(embed_dim=16, depth=2, num_heads=2, window_s=1.0, input_tdim=98)
TEXT = TextEncoderConfig(
    tokenizer="minilm", random_init=True, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
    max_tokens=12, hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip
CAPTIONS = ["a dog barks twice", "rain on a tin roof", "a bell rings then a man speaks"]


def tiny_model(audio_ckpt: bool, text_ckpt: bool, attention: str = "fused"):
    cfg = ModelConfig(
        audio=dataclasses.replace(AUDIO, activation_checkpointing=audio_ckpt, attention=attention),
        text=dataclasses.replace(TEXT, activation_checkpointing=text_ckpt),
        embed_dim=8,
    )
    torch.manual_seed(0)
    return build_model(cfg).train()


def one_step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ListNet loss of one batch (1.5 s, 2 s and 0.5 s clips) and every parameter's gradient."""
    rng = np.random.default_rng(0)
    audio = torch.from_numpy(rng.uniform(-0.5, 0.5, (3, 2 * SR)).astype(np.float32))
    lengths = torch.tensor([int(1.5 * SR), 2 * SR, SR // 2])
    sbert = torch.from_numpy(rng.standard_normal((3, 384)).astype(np.float32))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    audio_emb, text_emb = model(audio, lengths, CAPTIONS)
    loss = build_loss(LossConfig())(audio_emb, text_emb, sbert, torch.arange(3))["loss"]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def text_checkpointing_on(model: nn.Module) -> bool:
    """Hugging Face's own flag (is_activation_checkpointing in transformers 5, is_gradient_checkpointing before)."""
    text = model.text_encoder.model
    return (
        text.is_activation_checkpointing
        if hasattr(type(text), "is_activation_checkpointing")
        else (text.is_gradient_checkpointing)
    )


def attention_calls(model: nn.Module, grad: bool = True) -> dict[str, int]:
    """Forward calls of the attention modules in PaSST's blocks and RoBERTa's layers over one step (a recomputed
    block calls its attention twice)."""
    calls = {"audio": 0, "text": 0}

    def count(kind):
        def hook(*_):
            calls[kind] += 1

        return hook

    hooks = [b.attn.register_forward_hook(count("audio")) for b in model.audio_encoder.passt.blocks]
    hooks += [layer.attention.register_forward_hook(count("text")) for layer in model.text_encoder.model.encoder.layer]
    try:
        with torch.set_grad_enabled(grad):
            if grad:
                one_step(model)
            else:
                model(torch.zeros(1, SR) + 0.01, torch.tensor([SR]), CAPTIONS[:1])
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_checkpointing_gives_the_same_loss_and_gradients(attention):
    """With both encoders checkpointed, one step's loss and every parameter's gradient equal the plain model's
    (float32 tolerance), with either PaSST attention."""
    plain = tiny_model(False, False, attention)
    checkpointed = tiny_model(True, True, attention)
    checkpointed.load_state_dict(plain.state_dict(), strict=True)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # keys unchanged by the switch
    loss_plain, grads_plain = one_step(plain)
    loss_ckpt, grads_ckpt = one_step(checkpointed)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    assert any(n.startswith("audio_encoder.passt.blocks") for n in grads_plain)
    assert any(n.startswith("text_encoder.model.encoder.layer") for n in grads_plain)
    for name in grads_plain:
        torch.testing.assert_close(
            grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_checkpointing_is_really_on_per_encoder():
    """Each switch recomputes its own encoder's blocks in backward (attention called twice per block and window
    batch) and leaves the other alone; Hugging Face reports its checkpointing flag for the text model."""
    plain = attention_calls(tiny_model(False, False))
    assert plain == {"audio": 2, "text": 2}  # 2 blocks, 2 layers, one call each (one windows batch, one caption batch)
    audio_only = tiny_model(True, False)
    assert attention_calls(audio_only) == {"audio": 4, "text": 2}
    assert not text_checkpointing_on(audio_only)
    text_only = tiny_model(False, True)
    assert attention_calls(text_only) == {"audio": 2, "text": 4}
    assert text_checkpointing_on(text_only)


def test_checkpointing_does_nothing_in_eval_or_without_grad():
    """In evaluation mode, and under no_grad in training mode, a checkpointed model runs each block once."""
    model = tiny_model(True, True)
    assert attention_calls(model, grad=False) == {"audio": 2, "text": 2}
    model.eval()
    assert attention_calls(model, grad=True) == {"audio": 2, "text": 2}


def test_checkpointing_is_off_by_default():
    """Both switches default to off, in the dataclasses and in a config read with no YAML; overrides turn them on."""
    assert not AudioEncoderConfig().activation_checkpointing and not TextEncoderConfig().activation_checkpointing
    model = load_config(TrainConfig, None, []).model
    assert not model.audio.activation_checkpointing and not model.text.activation_checkpointing
    model = load_config(
        TrainConfig, None, ["model.audio.activation_checkpointing=true", "model.text.activation_checkpointing=true"]
    ).model
    assert model.audio.activation_checkpointing and model.text.activation_checkpointing
