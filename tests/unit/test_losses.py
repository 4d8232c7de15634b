import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relret.config import ListNetConfig, LossConfig, RelevanceConfig
from relret.losses import InfoNCELoss, ListNetLoss, build_loss, listnet_loss


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def _listnet_rows(sim_rows, rel_rows, tau, omega):
    """Plain-loop eq. (2)-(4): mean over rows of -sum_j p_j log q_j."""
    total = 0.0
    for s, g in zip(sim_rows, rel_rows):
        p = _softmax([x / omega for x in g])
        q = _softmax([x / tau for x in s])
        total += -sum(pj * math.log(qj) for pj, qj in zip(p, q))
    return total / len(sim_rows)


def _batch(b=6, e=8, d=5, seed=0, ids=None):
    rng = np.random.default_rng(seed)
    audio, text, sbert = rng.normal(size=(b, e)), rng.normal(size=(b, e)), rng.normal(size=(b, d))
    ids = np.arange(b) if ids is None else np.asarray(ids)
    return audio, text, sbert, ids


def _reference_listnet(audio, text, sbert, direction, tau=0.05, omega=0.05, a=2.73, b=4.58):
    n = len(audio)
    g = [[1 / (1 + math.exp(a - b * _cos(sbert[i], sbert[j]))) for j in range(n)] for i in range(n)]
    t2a = _listnet_rows([[_cos(text[i], audio[j]) for j in range(n)] for i in range(n)], g, tau, omega)
    a2t = _listnet_rows([[_cos(audio[j], text[i]) for i in range(n)] for j in range(n)], g, tau, omega)
    return {"t2a": t2a, "a2t": a2t, "both": (t2a + a2t) / 2}[direction]


def _reference_infonce(audio, text, ids, direction, tau=0.05):
    n = len(audio)

    def rows(queries, items):
        total = 0.0
        for i in range(n):
            q = _softmax([_cos(queries[i], items[j]) / tau for j in range(n)])
            pos = [j for j in range(n) if ids[j] == ids[i]]
            total += -sum(math.log(q[j]) for j in pos) / len(pos)
        return total / n

    t2a, a2t = rows(text, audio), rows(audio, text)
    return {"t2a": t2a, "a2t": a2t, "both": (t2a + a2t) / 2}[direction]


def test_listnet_loss_function_against_loop():
    """listnet_loss is exactly eq. (2)-(4) for several temperatures."""
    rng = np.random.default_rng(0)
    sim, rel = rng.uniform(-1, 1, size=(4, 7)), rng.uniform(0, 1, size=(4, 7))
    for tau, omega in [(0.05, 0.05), (0.1, 0.02), (1.0, 1.0)]:
        got = listnet_loss(torch.tensor(sim), torch.tensor(rel), tau, omega).item()
        assert got == pytest.approx(_listnet_rows(sim.tolist(), rel.tolist(), tau, omega), rel=1e-10)


def test_listnet_loss_gradient_matches_finite_differences():
    """The autograd gradient of listnet_loss w.r.t. the similarities matches central finite differences."""
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    rel = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: listnet_loss(s, rel, 0.1, 0.05), (sim,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("direction", ["t2a", "a2t", "both"])
def test_listnet_module_against_loop(direction):
    """ListNetLoss (single process) equals the plain-loop loss on normalised embeddings, for each direction."""
    audio, text, sbert, ids = _batch()
    out = ListNetLoss(direction)(torch.tensor(audio), torch.tensor(text), torch.tensor(sbert), torch.tensor(ids))
    assert out["loss"].item() == pytest.approx(_reference_listnet(audio, text, sbert, direction), rel=1e-9)
    assert set(out) == {"loss"} | ({f"loss_{direction}"} if direction != "both" else {"loss_t2a", "loss_a2t"})


@pytest.mark.parametrize("direction", ["t2a", "a2t", "both"])
def test_infonce_module_against_loop_with_co_positives(direction):
    """InfoNCELoss treats captions of the same clip as co-positives, as a plain loop does."""
    audio, text, sbert, ids = _batch(ids=[3, 7, 3, 1, 9, 7])
    out = InfoNCELoss(direction)(torch.tensor(audio), torch.tensor(text), torch.tensor(sbert), torch.tensor(ids))
    assert out["loss"].item() == pytest.approx(_reference_infonce(audio, text, ids, direction), rel=1e-9)


def test_only_what_the_targets_read_is_gathered():
    """InfoNCE gathers the clip ids and not the Sentence-BERT vectors (its targets do not read them); ListNet gathers
    both. Counted on the gather calls themselves (one process: each call is the identity)."""
    from relret import distributed

    audio, text, sbert, ids = (torch.tensor(x) for x in _batch(b=6))
    for loss, want in ((InfoNCELoss("t2a"), {"clip_ids"}), (ListNetLoss("t2a"), {"caption_sbert", "clip_ids"})):
        calls = []
        gather = distributed.all_gather_cat

        def spy(t, with_grad, sizes=None, gather=gather, calls=calls):
            calls.append(t)
            return gather(t, with_grad, sizes)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(distributed, "all_gather_cat", spy)
            batch = loss._gather(*loss._check(audio, text, {"caption_sbert": sbert, "clip_ids": ids}))
        assert set(batch.inputs) == want, type(loss).__name__
        assert len(calls) == 2 + len(want)  # audio and text embeddings, then the inputs


def test_infonce_with_distinct_clips_is_clip_cross_entropy():
    """With one caption per clip, InfoNCE 'both' is the symmetric CLIP cross-entropy with diagonal labels."""
    audio, text, sbert, ids = (torch.tensor(x) for x in _batch(b=9))
    a, t = F.normalize(audio, dim=1), F.normalize(text, dim=1)
    logits = t @ a.T / 0.05
    labels = torch.arange(9)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert InfoNCELoss("both")(audio, text, sbert, ids)["loss"].item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("name", ["listnet", "infonce"])
def test_module_gradients_match_finite_differences(name):
    """Gradients w.r.t. audio and text embeddings match finite differences (float64)."""
    audio, text, sbert, ids = (torch.tensor(x) for x in _batch(b=4, e=3, ids=[0, 1, 0, 2]))
    options = ListNetConfig(omega=0.1) if name == "listnet" else None
    fn = build_loss(LossConfig(name=name, direction="both", tau=0.2, options=options))
    audio.requires_grad_(True)
    text.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, t: fn(a, t, sbert, ids)["loss"], (audio, text), eps=1e-6, atol=1e-6)


def test_listnet_mean_aggregate_against_loop():
    """With aggregate='mean', the target of clip j is f(mean cosine to all of j's real captions)."""
    audio, text, sbert, ids = _batch(b=3)
    rng = np.random.default_rng(5)
    clip_sbert = rng.normal(size=(3, 2, 5))
    mask = np.array([[True, True], [True, False], [True, True]])
    loss = ListNetLoss("t2a", relevance=RelevanceConfig(aggregate="mean"))
    got = loss(
        *(torch.tensor(x) for x in (audio, text, sbert, ids)),
        clip_sbert=torch.tensor(clip_sbert),
        caption_mask=torch.tensor(mask),
    )["loss"].item()
    g = [
        [
            1
            / (1 + math.exp(2.73 - 4.58 * np.mean([_cos(sbert[i], clip_sbert[j, c]) for c in range(2) if mask[j, c]])))
            for j in range(3)
        ]
        for i in range(3)
    ]
    sims = [[_cos(text[i], audio[j]) for j in range(3)] for i in range(3)]
    assert got == pytest.approx(_listnet_rows(sims, g, 0.05, 0.05), rel=1e-9)


def test_binary_listnet_approaches_infonce_as_omega_shrinks():
    """ListNet with binary relevance and tiny omega puts the whole target on the own clip, i.e. InfoNCE."""
    audio, text, sbert, ids = (torch.tensor(x) for x in _batch())
    listnet = ListNetLoss("t2a", omega=1e-3, relevance=RelevanceConfig(fn="binary"))(audio, text, sbert, ids)
    infonce = InfoNCELoss("t2a")(audio, text, sbert, ids)
    assert listnet["loss"].item() == pytest.approx(infonce["loss"].item(), rel=1e-6)


def test_calibration_file_sets_constants(tmp_path):
    """relevance.calibration replaces a and b with the YAML's values."""
    path = tmp_path / "cal.yaml"
    path.write_text("a: 1.5\nb: 3.0\nsbert: test\n")
    fn = ListNetLoss("t2a", relevance=RelevanceConfig(calibration=str(path)))
    assert (fn.relevance.a, fn.relevance.b) == (1.5, 3.0)
    audio, text, sbert, ids = _batch()
    got = fn(*(torch.tensor(x) for x in (audio, text, sbert, ids)))["loss"].item()
    assert got == pytest.approx(_reference_listnet(audio, text, sbert, "t2a", a=1.5, b=3.0), rel=1e-9)


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(audio=torch.ones(3, 4), text=torch.ones(3, 5)), "must have the same shape"),
        (dict(sbert=torch.ones(2, 5)), "caption_sbert has 2 rows but the batch has 3"),
        (dict(ids=torch.tensor([0.0, 1.0, 2.0])), "clip_ids must be"),
        (dict(ids=torch.tensor([0, 1])), "clip_ids must be"),
        (
            dict(audio=torch.ones(0, 4), text=torch.ones(0, 4), sbert=torch.ones(0, 5), ids=torch.ones(0).long()),
            "empty",
        ),
        (dict(audio=torch.tensor([[1.0, float("nan"), 0, 0]] * 3)), "audio_emb holds NaN"),
        (dict(text=torch.zeros(3, 4)), "text_emb has a zero-norm vector"),
    ],
)
def test_module_bad_input(args, match):
    """Bad shapes, dtypes, empty batches, NaN and zero-norm embeddings raise a ValueError naming the problem."""
    base = dict(audio=torch.randn(3, 4), text=torch.randn(3, 4), sbert=torch.randn(3, 5), ids=torch.arange(3))
    base.update(args)
    for fn in (ListNetLoss("both"), InfoNCELoss("both")):
        with pytest.raises(ValueError, match=match):
            fn(base["audio"], base["text"], base["sbert"], base["ids"])


def test_bad_options_are_refused():
    """Unknown direction, non-positive temperatures and a missing calibration file are refused at construction."""
    with pytest.raises(ValueError, match="unknown direction 'up'"):
        ListNetLoss("up")
    with pytest.raises(ValueError, match="omega must be > 0"):
        ListNetLoss("t2a", omega=0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        InfoNCELoss("t2a", tau=-1)
    with pytest.raises(ValueError, match="no file"):
        ListNetLoss(relevance=RelevanceConfig(calibration="/nonexistent/cal.yaml"))
    with pytest.raises(ValueError, match="similarity .* and relevance .* must have the same shape"):
        listnet_loss(torch.ones(2, 3), torch.ones(2, 4))
