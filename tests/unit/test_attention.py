"""FusedAttention and the PaSST helpers against hear21passt's own attention and an unchanged model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from relret.models.attention import (
    FusedAttention,
    checkpoint_passt_blocks,
    fuse_passt_attention,
    unfuse_passt_attention,
)

passt_module = pytest.importorskip("hear21passt.models.passt")
passt_module.first_RUN = False

# float32: the fused kernel sums in another order than softmax(q k^T) v by hand
TOL = {"rtol": 1e-4, "atol": 1e-5}


def tiny_passt(s_patchout_t: int = 0, s_patchout_f: int = 0, **kwargs) -> nn.Module:
    """A 2-block, 64-wide PaSST built as relret.models.audio builds PaSST-S (14 tokens on a 32 x 100 input)."""
    torch.manual_seed(0)
    model = passt_module.PaSST(
        img_size=(32, 100),
        patch_size=16,
        stride=(16, 16),
        in_chans=1,
        num_classes=0,
        embed_dim=64,
        depth=2,
        num_heads=4,
        distilled=True,
        s_patchout_t=s_patchout_t,
        s_patchout_f=s_patchout_f,
        **kwargs,
    )
    model.head = nn.Identity()
    model.head_dist = None
    return model


def run_passt(model: nn.Module, spec: torch.Tensor, seed: int = 123) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Embedding [B, E] (mean of class and distillation tokens) and the gradient of a fixed loss for each parameter."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # patchout, dropout and drop path draw from torch's global RNG
    cls_token, dist_token = model.forward_features(spec)
    emb = (cls_token + dist_token) / 2
    weights = torch.linspace(-1, 1, emb.numel()).view_as(emb)
    (emb * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return emb.detach(), grads


def spectrogram(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 32, 100, generator=torch.Generator().manual_seed(1))


def assert_same_run(expected, actual, **tol) -> None:
    (emb_a, grads_a), (emb_b, grads_b) = expected, actual
    torch.testing.assert_close(emb_b, emb_a, **tol)
    assert grads_b.keys() == grads_a.keys()
    assert len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tokens", [1, 17, 1190])
def test_fused_attention_equals_hear21passt_attention(tokens):
    """FusedAttention gives hear21passt's Attention's output and gradients (input and weights) for 1-1190 tokens."""
    torch.manual_seed(0)
    reference = passt_module.Attention(64, num_heads=4, qkv_bias=True)
    fused = FusedAttention(64, num_heads=4, qkv_bias=True)
    fused.load_state_dict(reference.state_dict(), strict=True)  # same keys, same shapes
    x = torch.randn(2, tokens, 64)
    results = []
    for module in (reference, fused):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), xi.grad, module.qkv.weight.grad, module.proj.bias.grad))
    assert results[0][0].shape == (2, tokens, 64)
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, **TOL)


def test_flop_counter_counts_fused_attention_on_cpu():
    """torch.utils.flop_counter counts FusedAttention's CPU kernel as torch counts the CUDA flash kernel: the
    hand-written attention's FLOPs plus the q k^T that flash recomputes in backward (not 0 for the attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    reference = passt_module.Attention(64, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 100, 64, requires_grad=True)
    counts = []
    for module in (reference, FusedAttention.from_attention(reference)):
        counter = FlopCounterMode(display=False)
        with counter:
            module(x).sum().backward()
        counts.append(counter.get_total_flops())
    linear = 3 * 2 * (2 * 100) * 64 * (3 * 64 + 64)  # qkv and proj: forward, input and weight gradients
    matmul = 2 * 2 * 4 * 100**2 * 16  # one [n, d] x [d, n] or [n, n] x [n, d] product per head: 2 b h n^2 d
    assert counts[0] == linear + 6 * matmul  # q k^T and a v forward, two gradients of each backward
    assert counts[1] == counts[0] + matmul


def test_fused_attention_keeps_a_non_default_scale():
    """A scale other than head_dim ** -0.5 set on hear21passt's Attention is the one FusedAttention uses."""
    torch.manual_seed(0)
    reference = passt_module.Attention(64, num_heads=4, qkv_bias=True)
    reference.scale = 0.37
    x = torch.randn(2, 17, 64)
    expected = reference(x)
    fused = FusedAttention.from_attention(reference)
    assert fused.scale == 0.37
    torch.testing.assert_close(fused(x), expected, **TOL)
    # and it matters: the default scale gives another output
    assert not torch.allclose(FusedAttention.from_attention(passt_module.Attention(64, 4, qkv_bias=True))(x), expected)


def test_fused_attention_dropout_only_in_training():
    """attn_drop.p is applied in training only (equality with hear21passt's random dropout masks needs p = 0)."""
    torch.manual_seed(0)
    reference = passt_module.Attention(64, num_heads=4, qkv_bias=True, attn_drop=0.5).eval()
    fused = FusedAttention.from_attention(reference)
    x = torch.randn(2, 17, 64)
    expected = reference(x)
    torch.testing.assert_close(fused(x), expected, **TOL)
    fused.train()
    torch.manual_seed(1)
    dropped = fused(x)
    assert (dropped - expected).abs().max() > 1e-2
    torch.manual_seed(1)
    torch.testing.assert_close(fused(x), dropped)  # same seed, same mask


def test_from_attention_moves_the_modules():
    """from_attention reuses the wrapped module's qkv/proj/dropouts (no copies) and its training flag."""
    reference = passt_module.Attention(64, num_heads=4, qkv_bias=True).eval()
    fused = FusedAttention.from_attention(reference)
    assert fused.qkv is reference.qkv and fused.proj is reference.proj
    assert fused.attn_drop is reference.attn_drop and fused.proj_drop is reference.proj_drop
    assert fused.num_heads == 4 and not fused.training
    assert list(fused.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("patchout", [(0, 0), (2, 1)], ids=["no-patchout", "patchout"])
def test_fused_passt_equals_original(train, patchout):
    """A PaSST equals itself after fuse_passt_attention: embeddings and all parameter gradients, same state dict."""
    model = tiny_passt(*patchout).train(train)
    spec = spectrogram()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    expected = run_passt(model, spec)
    assert fuse_passt_attention(model) == 2
    assert all(type(block.attn) is FusedAttention for block in model.blocks)
    actual = run_passt(model, spec)
    assert_same_run(expected, actual, **TOL)
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
        assert after[key].data_ptr() == pointers[key], key  # the same storage, not a copy


def test_patchout_changes_the_output_so_the_reseeding_matters():
    """Structured patchout in training really drops patches: two seeds give two embeddings."""
    model = tiny_passt(2, 1).train()
    spec = spectrogram()
    assert not torch.allclose(run_passt(model, spec, seed=1)[0], run_passt(model, spec, seed=2)[0])


def test_fused_passt_loads_an_unfused_checkpoint():
    """A state dict saved from the hand-written PaSST loads strictly into a fused one and gives the same output."""
    saved = tiny_passt().eval()
    fused = tiny_passt().eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(1.0)  # differ from `saved` until loaded
    fuse_passt_attention(fused)
    fused.load_state_dict(saved.state_dict(), strict=True)
    spec = spectrogram()
    with torch.no_grad():
        torch.testing.assert_close(fused.forward_features(spec)[0], saved.forward_features(spec)[0], **TOL)


def test_fuse_is_idempotent():
    """A second fuse_passt_attention swaps nothing and returns 0."""
    model = tiny_passt()
    assert fuse_passt_attention(model) == 2
    modules = [block.attn for block in model.blocks]
    assert fuse_passt_attention(model) == 0
    assert [block.attn for block in model.blocks] == modules


def test_fuse_refuses_other_modules():
    """fuse_passt_attention raises ValueError for a non-PaSST, an encoder wrapper, or an unknown attention type."""
    with pytest.raises(ValueError, match="expected a hear21passt PaSST.*got Linear"):
        fuse_passt_attention(nn.Linear(2, 2))
    wrapper = nn.Module()
    wrapper.passt = tiny_passt()
    with pytest.raises(ValueError, match=r"pass the encoder's \.passt"):
        fuse_passt_attention(wrapper)
    model = tiny_passt()
    model.blocks[1].attn = nn.MultiheadAttention(64, 4)
    first = model.blocks[0].attn
    with pytest.raises(ValueError, match=r"blocks\[1\]\.attn is torch.*MultiheadAttention"):
        fuse_passt_attention(model)
    assert model.blocks[0].attn is first  # nothing changed


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_unfuse_restores_hear21passt_attention(train):
    """unfuse_passt_attention puts hear21passt's Attention back on the same parameters: the fused model's output and
    gradients, the same state dict and storage, the training flag kept; a second call swaps nothing."""
    model = tiny_passt(2, 1).train(train)
    fuse_passt_attention(model)
    spec = spectrogram()
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    expected = run_passt(model, spec)
    assert unfuse_passt_attention(model) == 2
    assert all(type(block.attn) is passt_module.Attention for block in model.blocks)
    assert all(block.attn.training == train for block in model.blocks)
    assert unfuse_passt_attention(model) == 0
    assert_same_run(expected, run_passt(model, spec), **TOL)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers


def test_unfuse_refuses_other_modules():
    """unfuse_passt_attention raises ValueError for a non-PaSST or an unknown attention type, changing nothing."""
    with pytest.raises(ValueError, match="expected a hear21passt PaSST.*got Linear"):
        unfuse_passt_attention(nn.Linear(2, 2))
    model = tiny_passt()
    fuse_passt_attention(model)
    model.blocks[1].attn = nn.MultiheadAttention(64, 4)
    first = model.blocks[0].attn
    with pytest.raises(ValueError, match=r"blocks\[1\]\.attn is torch.*MultiheadAttention"):
        unfuse_passt_attention(model)
    assert model.blocks[0].attn is first


@pytest.mark.parametrize("fused", [False, True], ids=["hand-written", "fused"])
def test_checkpointed_blocks_give_the_same_gradients(fused):
    """With checkpoint_passt_blocks, outputs and gradients equal the plain model's (patchout, dropout, drop path on)."""
    model = tiny_passt(2, 1, drop_rate=0.1, drop_path_rate=0.2).train()
    spec = spectrogram()
    if fused:
        fuse_passt_attention(model)
    expected = run_passt(model, spec)
    keys = list(model.state_dict())
    assert checkpoint_passt_blocks(model) == 2
    assert list(model.state_dict()) == keys
    actual = run_passt(model, spec)
    # the recomputation replays the same RNG draws: identical up to float rounding
    assert_same_run(expected, actual, rtol=1e-5, atol=1e-6)
    # and the dropouts are live: another seed gives another result
    assert not torch.allclose(run_passt(model, spec, seed=7)[0], actual[0])


def count_attention_calls(model: nn.Module, train: bool, grad: bool) -> int:
    calls = []
    handles = [block.attn.register_forward_hook(lambda *_: calls.append(1)) for block in model.blocks]
    model.train(train)
    with torch.set_grad_enabled(grad):
        cls_token, _ = model.forward_features(spectrogram())
        if grad:
            cls_token.sum().backward()
    for handle in handles:
        handle.remove()
    return len(calls)


def test_checkpointing_recomputes_only_in_training_with_grad():
    """Checkpointed blocks run twice (forward + recompute) in training with autograd on, once in eval or no_grad."""
    model = tiny_passt()
    assert count_attention_calls(model, train=True, grad=True) == 2
    assert checkpoint_passt_blocks(model) == 2
    assert checkpoint_passt_blocks(model) == 0  # idempotent
    assert count_attention_calls(model, train=True, grad=True) == 4
    assert count_attention_calls(model, train=False, grad=True) == 2
    assert count_attention_calls(model, train=True, grad=False) == 2


def test_checkpointed_model_survives_deepcopy():
    """A deepcopy of a checkpointed PaSST runs its own blocks: gradients land on the copy's parameters only."""
    model = tiny_passt().train()
    checkpoint_passt_blocks(model)
    clone = copy.deepcopy(model)
    assert clone.blocks[0].forward.args[0] is clone.blocks[0]
    expected = run_passt(model, spectrogram())
    model.zero_grad(set_to_none=True)
    actual = run_passt(clone, spectrogram())
    assert all(p.grad is None for p in model.parameters())
    assert_same_run(expected, actual, rtol=1e-5, atol=1e-6)


def test_checkpoint_refuses_other_modules():
    """checkpoint_passt_blocks raises ValueError for a module without PaSST blocks."""
    with pytest.raises(ValueError, match="expected a hear21passt PaSST"):
        checkpoint_passt_blocks(nn.Sequential(nn.Linear(2, 2)))
