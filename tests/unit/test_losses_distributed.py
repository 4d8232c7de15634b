"""Two gloo ranks against one process on the concatenated batch (forward values and gradients)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from relret import distributed
from relret.config import RelevanceConfig
from relret.losses import InfoNCELoss, ListNetLoss, listnet_loss
from relret.relevance import relevance_matrix

WORLD = 2
B, E_IN, E, D = 8, 6, 4, 5
IDS = torch.tensor([0, 1, 2, 3, 0, 5, 6, 2])  # clips 0 and 2 occur on both ranks: co-positives across ranks

CASES = [
    (name, direction, local_loss, with_grad, "logistic", "paired")
    for name, direction, local_loss, with_grad in itertools.product(
        ["listnet", "infonce"], ["t2a", "a2t", "both"], [True, False], [True, False]
    )
] + [
    ("listnet", "both", True, True, "minmax", "mean"),
    ("listnet", "both", True, True, "binary", "max"),
]


def _inputs():
    gen = torch.Generator().manual_seed(1234)
    x_audio, x_text = (
        torch.randn(B, E_IN, generator=gen, dtype=torch.float64),
        torch.randn(B, E_IN, generator=gen, dtype=torch.float64),
    )
    sbert = torch.randn(B, D, generator=gen, dtype=torch.float64)
    clip_sbert = torch.randn(B, 3, D, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, 3, dtype=torch.bool)
    mask[1, 2] = mask[6, 1:] = False
    w_audio, w_text = (
        torch.randn(E_IN, E, generator=gen, dtype=torch.float64),
        torch.randn(E_IN, E, generator=gen, dtype=torch.float64),
    )
    return x_audio, x_text, sbert, clip_sbert, mask, w_audio, w_text


def _make(case):
    name, direction, local_loss, with_grad, fn, aggregate = case
    if name == "listnet":
        return ListNetLoss(direction, 0.1, 0.05, RelevanceConfig(fn=fn, aggregate=aggregate), local_loss, with_grad)
    return InfoNCELoss(direction, 0.1, local_loss, with_grad)


def _step(case, rows):
    """Loss and the two weight gradients for the samples in `rows` (in this process)."""
    x_audio, x_text, sbert, clip_sbert, mask, w_audio, w_text = _inputs()
    w_audio.requires_grad_(True)
    w_text.requires_grad_(True)
    extra = {}
    if case[5] != "paired":
        extra = dict(clip_sbert=clip_sbert[rows], caption_mask=mask[rows])
    out = _make(case)(x_audio[rows] @ w_audio, x_text[rows] @ w_text, sbert[rows], IDS[rows], **extra)
    out["loss"].backward()
    return out["loss"].detach(), w_audio.grad, w_text.grad


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = []
        per_rank = B // WORLD
        for case in CASES:
            loss, g_audio, g_text = _step(case, slice(rank * per_rank, (rank + 1) * per_rank))
            for t in (loss, g_audio, g_text):  # what DeepSpeed/DDP do: average over data-parallel ranks
                dist.all_reduce(t)
                t /= WORLD
            results.append((loss, g_audio, g_text))
        # Uneven gathers: rank 0 holds 2 rows, rank 1 holds 3.
        x = torch.arange(2 + rank, dtype=torch.float64).unsqueeze(1) + 10 * rank
        gathered = distributed.all_gather_cat(x, with_grad=False)
        if rank == 0:
            torch.save({"results": results, "uneven": gathered}, out_file)
    finally:
        distributed.cleanup_distributed()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    out = tmp / "results.pt"
    mp.spawn(_worker, args=(str(tmp / "init"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True)


def _approximate_reference(case):
    """local_loss with gather_with_grad=False: rank r's loss sees other ranks' embeddings as constants."""
    name, direction, *_ = case
    x_audio, x_text, sbert, _, _, w_audio, w_text = _inputs()
    w_audio.requires_grad_(True)
    w_text.requires_grad_(True)
    audio, text = F.normalize(x_audio @ w_audio, dim=1), F.normalize(x_text @ w_text, dim=1)
    per_rank, total = B // WORLD, 0.0
    for r in range(WORLD):
        rows = slice(r * per_rank, (r + 1) * per_rank)
        keep = torch.zeros(B, 1, dtype=torch.bool)
        keep[rows] = True
        a_mix, t_mix = torch.where(keep, audio, audio.detach()), torch.where(keep, text, text.detach())
        terms = []
        for d in ["t2a", "a2t"] if direction == "both" else [direction]:
            queries, items = (t_mix, a_mix) if d == "t2a" else (a_mix, t_mix)
            sim = queries[rows] @ items.T
            if name == "listnet":
                terms.append(listnet_loss(sim, relevance_matrix(sbert[rows], sbert), 0.1, 0.05))
            else:
                pos = (IDS[rows, None] == IDS[None, :]).double()
                terms.append(-(pos / pos.sum(1, keepdim=True) * F.log_softmax(sim / 0.1, dim=1)).sum(1).mean())
        total = total + sum(terms) / len(terms)
    (total / WORLD).backward()
    return w_audio.grad, w_text.grad


@pytest.mark.distributed
@pytest.mark.parametrize("index", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_two_ranks_match_one_process(two_rank_results, index):
    """Mean of the ranks' losses = one-process loss; DP-averaged gradients = one-process gradients (exact modes)."""
    case = CASES[index]
    loss2, g_audio2, g_text2 = two_rank_results["results"][index]
    loss1, g_audio1, g_text1 = _step(case, slice(0, B))
    assert loss2.item() == pytest.approx(loss1.item(), rel=1e-10)
    name, direction, local_loss, with_grad, *_ = case
    if local_loss and not with_grad:
        # open_clip's cheap mode is not the full gradient; it must equal its own definition. The side that is only
        # ever a row (text for t2a, audio for a2t) keeps its exact gradient; the other one loses terms.
        g_audio_ref, g_text_ref = _approximate_reference(case)
        exact = [torch.allclose(g2, g1, rtol=1e-6) for g2, g1 in ((g_audio2, g_audio1), (g_text2, g_text1))]
        assert exact == {"t2a": [False, True], "a2t": [True, False], "both": [False, False]}[direction]
    else:
        g_audio_ref, g_text_ref = g_audio1, g_text1
    torch.testing.assert_close(g_audio2, g_audio_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_text2, g_text_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.distributed
def test_uneven_gather(two_rank_results):
    """all_gather_cat concatenates different row counts per rank in rank order."""
    assert two_rank_results["uneven"].squeeze(1).tolist() == [0.0, 1.0, 10.0, 11.0, 12.0]


def test_no_process_group_gathers_are_identity():
    """Without a process group every helper behaves as a world of one."""
    x = torch.randn(3, 2)
    assert distributed.get_world_size() == 1 and distributed.get_rank() == 0
    assert distributed.all_gather_cat(x, with_grad=True) is x
    assert distributed.gather_sizes(3) == [3]
