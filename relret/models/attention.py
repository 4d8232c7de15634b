"""PaSST on fused attention, and activation checkpointing of its transformer blocks.

    fuse_passt_attention(encoder.passt)      # every block's hear21passt Attention -> FusedAttention (same parameters)
    unfuse_passt_attention(encoder.passt)    # and back: FusedAttention -> hear21passt's Attention
    checkpoint_passt_blocks(encoder.passt)   # each block recomputes its activations in backward (training only)

`PaSSTEncoder` applies them at build time, after the weights load: `model.audio.attention` picks one of the first two
through `relret.config.PASST_ATTENTION` (fused by default), `model.audio.activation_checkpointing` the third.

hear21passt's `Attention.forward` builds the [B, heads, N, N] attention matrix by hand (softmax(q k^T * scale) v), which
keeps torch from using the fused kernels (flash / memory-efficient on CUDA, flash on CPU) that
`torch.nn.functional.scaled_dot_product_attention` dispatches to. `FusedAttention` holds the same submodules under the
same names (qkv, attn_drop, proj, proj_drop) and the same `num_heads` and `scale`, so checkpoints load unchanged and the
swap moves the existing parameter objects instead of copying them.

The helpers change modules in place, keep every state-dict key and value, and are idempotent (a second call does
nothing and returns 0). For the text encoder, Hugging Face models have their own switch, which
`relret.models.text.enable_activation_checkpointing` calls (`activation_checkpointing_enable()` in transformers 5,
where `gradient_checkpointing_enable()` is its deprecated alias).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import relret  # noqa: F401  (compatibility step before hear21passt imports torchaudio/timm)


def _count_cpu_flash_attention_flops() -> None:
    """Teach `torch.utils.flop_counter` the CPU flash-attention kernels that SDPA dispatches to on CPU.

    torch registers FLOP formulas for the CUDA kernels (flash, memory-efficient, cuDNN) only, so on CPU a
    FlopCounterMode would count FusedAttention's attention matmuls as 0 FLOPs and the MFU of the benchmarks' CPU
    paths would drop with the fused default. The formulas are the ones torch registers for the CUDA flash kernel,
    whose arguments start alike (query, key, value; grad_out first in the backward)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    for cpu_name, cuda_name in (
        ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward"),
    ):
        cpu_op, cuda_op = getattr(aten, cpu_name, None), getattr(aten, cuda_name, None)
        formula = flop_counter.flop_registry.get(cuda_op)
        if cpu_op is None or formula is None or cpu_op in flop_counter.flop_registry:
            continue  # another torch: nothing to add, or torch counts it already
        flop_counter.register_flop_formula(cpu_op, get_raw=True)(formula)  # `formula` takes tensors already


_count_cpu_flash_attention_flops()


class FusedAttention(nn.Module):
    """hear21passt's `Attention` with `F.scaled_dot_product_attention`: x [B, N, C] -> [B, N, C].

    Same submodules, attributes and state-dict keys as `hear21passt.models.passt.Attention`; outputs equal it up to
    float rounding. Attention dropout (`attn_drop.p`) is applied inside the fused kernel in training only, so it
    draws different random numbers than hear21passt's separate `nn.Dropout` (equal outputs only with p = 0).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_attention(cls, attn: nn.Module) -> FusedAttention:
        """A FusedAttention that holds `attn`'s own submodules (no copies) and its num_heads and scale."""
        for name in ("qkv", "attn_drop", "proj", "proj_drop", "num_heads", "scale"):
            if not hasattr(attn, name):
                raise ValueError(f"{type(attn).__name__} has no attribute {name!r}: not a hear21passt Attention")
        if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
            raise ValueError(f"{type(attn).__name__}.qkv and .proj must be nn.Linear: not a hear21passt Attention")
        if not isinstance(attn.attn_drop, nn.Dropout):
            raise ValueError(f"{type(attn).__name__}.attn_drop must be nn.Dropout, got {type(attn.attn_drop).__name__}")
        dim = attn.qkv.in_features
        if attn.qkv.out_features != 3 * dim or dim % attn.num_heads:
            raise ValueError(
                f"{type(attn).__name__}: qkv maps {dim} -> {attn.qkv.out_features} with num_heads={attn.num_heads}; "
                "expected dim -> 3 * dim with dim divisible by num_heads"
            )
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_heads = attn.num_heads
        fused.scale = attn.scale
        fused.qkv = attn.qkv
        fused.attn_drop = attn.attn_drop
        fused.proj = attn.proj
        fused.proj_drop = attn.proj_drop
        fused.train(attn.training)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        dropout_p = self.attn_drop.p if self.training else 0.0
        # scale given explicitly: it is whatever the wrapped module used, not necessarily head_dim ** -0.5
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        x = x.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(x))


def _passt_blocks(passt: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a hear21passt PaSST, each with an `attn`; ValueError for anything else."""
    blocks = getattr(passt, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        hint = " (pass the encoder's .passt)" if isinstance(getattr(passt, "passt", None), nn.Module) else ""
        raise ValueError(
            f"expected a hear21passt PaSST with a non-empty nn.Sequential `blocks`, got {type(passt).__name__}{hint}"
        )
    for i, block in enumerate(blocks):
        if not isinstance(getattr(block, "attn", None), nn.Module):
            raise ValueError(f"{type(passt).__name__}.blocks[{i}] ({type(block).__name__}) has no `attn` module")
    return list(blocks)


def _swap_attention(passt: nn.Module, source: type, convert, refusal: str) -> int:
    """Replace every block's `attn` of type `source` by `convert(attn)`; the number swapped. Every block is checked
    first (its attention must be hear21passt's or FusedAttention, else ValueError ending in `refusal`), so a refused
    model is left untouched."""
    from hear21passt.models.passt import Attention

    blocks = _passt_blocks(passt)
    for i, block in enumerate(blocks):
        if type(block.attn) not in (Attention, FusedAttention):
            raise ValueError(
                f"{type(passt).__name__}.blocks[{i}].attn is {type(block.attn).__module__}.{type(block.attn).__name__}"
                f"; {refusal}"
            )
    swapped = 0
    for block in blocks:
        if type(block.attn) is source:
            block.attn = convert(block.attn)
            swapped += 1
    return swapped


def fuse_passt_attention(passt: nn.Module) -> int:
    """Replace every block's hear21passt `Attention` with a `FusedAttention` holding the same parameters.

    Returns the number of blocks swapped (0 when all are fused already). State-dict keys and tensors are unchanged
    (the same parameter objects move into the new modules). Raises ValueError, leaving `passt` untouched, for a
    module that is not a hear21passt PaSST or whose attention is neither hear21passt's nor FusedAttention.
    """
    from hear21passt.models.passt import Attention

    return _swap_attention(
        passt, Attention, FusedAttention.from_attention, "only hear21passt.models.passt.Attention can be fused"
    )


def unfuse_passt_attention(passt: nn.Module) -> int:
    """Replace every block's `FusedAttention` with hear21passt's `Attention` holding the same parameters.

    The reverse of `fuse_passt_attention`, with the same contract: returns the number of blocks swapped (0 when none
    is fused), keeps state-dict keys and tensors, and raises ValueError, leaving `passt` untouched, for a module that
    is not a hear21passt PaSST or whose attention is neither of the two.
    """
    from hear21passt.models.passt import Attention

    def to_reference(fused: FusedAttention) -> nn.Module:
        reference = Attention.__new__(Attention)  # its __init__ would draw fresh weights only to drop them
        nn.Module.__init__(reference)
        for name in ("num_heads", "scale", "qkv", "attn_drop", "proj", "proj_drop"):
            setattr(reference, name, getattr(fused, name))
        reference.train(fused.training)
        return reference

    return _swap_attention(
        passt,
        FusedAttention,
        to_reference,
        "only relret's FusedAttention can be swapped back to hear21passt's Attention",
    )


def _checkpointed_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    forward = type(block).forward  # the class's own forward, not the instance attribute that points here
    if block.training and torch.is_grad_enabled():
        # preserve_rng_state (the default) replays the same dropout / drop-path masks in the recomputation
        return checkpoint(forward, block, x, use_reentrant=False)
    return forward(block, x)


def checkpoint_passt_blocks(passt: nn.Module) -> int:
    """Make each transformer block of a hear21passt PaSST run under `torch.utils.checkpoint` in training.

    Only the blocks' `forward` is replaced (an instance attribute; a `functools.partial`, so deepcopy and pickling
    keep pointing at the right block): module paths and state-dict keys stay as they are. Activations inside a block
    are recomputed in backward when the block is in training mode and autograd is recording; in eval or under
    `torch.no_grad()` the block runs as before. Returns the number of blocks changed (0 when all were already).
    """
    swapped = 0
    for block in _passt_blocks(passt):
        current = block.__dict__.get("forward")
        if isinstance(current, functools.partial) and current.func is _checkpointed_forward:
            continue
        if current is not None:
            raise ValueError(f"{type(block).__name__}.forward is already overridden on the instance: {current!r}")
        block.forward = functools.partial(_checkpointed_forward, block)
        swapped += 1
    return swapped
