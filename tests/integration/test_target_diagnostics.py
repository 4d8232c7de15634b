"""The ListNet target diagnostics that training logs per step (issue #17) equal what `relret relevance-stats`
computes on the same batch: one real step of relret/train.py, its batch's Sentence-BERT vectors captured on the way
into the loss, and relret.target_stats.batch_target_stats (the function the command averages) on those vectors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from kit import REPO
from kit.shards import write_shard_dir

from relret.config import TrainConfig, load_config
from relret.target_stats import batch_target_stats

TINY = REPO / "configs" / "tiny_cpu.yaml"

# relret/train.py in a fresh process (as every training test runs it: the process group, DeepSpeed's state and the
# exported RANK/WORLD_SIZE stay out of pytest's process), with the built loss's forward wrapped so that each call's
# caption_sbert and clip_ids are saved exactly as the loss received them.
RECORDING_TRAIN = """
import sys

import numpy as np

import relret.losses

out_dir, argv = sys.argv[1], sys.argv[2:]
build_loss = relret.losses.build_loss


def recording_build_loss(cfg):
    loss = build_loss(cfg)
    forward, calls = loss.forward, []

    def recorded(audio_emb, text_emb, *args, **kwargs):
        inputs = dict(zip(loss.inputs, args), **kwargs)
        for name in ("caption_sbert", "clip_ids"):
            np.save(f"{out_dir}/call{len(calls)}_{name}.npy", inputs[name].detach().cpu().numpy())
        calls.append(None)
        return forward(audio_emb, text_emb, *args, **kwargs)

    loss.forward = recorded
    return loss


relret.losses.build_loss = recording_build_loss  # the Trainer imports it from relret.losses when it sets up
from relret.train import main

sys.exit(main(argv))
"""


def test_logged_step_diagnostics_equal_relevance_stats_on_that_batch(tmp_path):
    """One step of the real trainer on 8 synthetic clips (one global batch of 8, one rank): target_own_mass,
    target_entropy and target_max_other in metrics.jsonl and in the step line equal batch_target_stats on the 8
    caption vectors the loss received, with the run's omega and relevance (to 1e-6; the targets are far from one-hot,
    so the comparison has content)."""
    write_shard_dir(tmp_path / "shards", n_clips=8, per_shard=4, seed=2)
    run, captured = tmp_path / "run", tmp_path / "captured"
    captured.mkdir()
    script = tmp_path / "recording_train.py"
    script.write_text(RECORDING_TRAIN)
    argv = ["--config", str(TINY), "--run-dir", str(run), f"data.train=[{{path: {tmp_path / 'shards'}}}]"]
    argv += ["data.val=[]", "data.num_workers=0", "train.epochs=1", "train.global_batch_size=8"]
    argv += ["train.log_every_steps=1", "train.progress_bar=false", "loss.name=listnet", "loss.listnet.omega=0.1"]
    proc = subprocess.run(
        [sys.executable, str(script), str(captured), *argv], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in records if r["kind"] == "train"]
    assert step["step"] == 1
    assert sorted(p.name for p in captured.iterdir()) == ["call0_caption_sbert.npy", "call0_clip_ids.npy"]
    sbert = np.load(captured / "call0_caption_sbert.npy", allow_pickle=False)
    clip_ids = np.load(captured / "call0_clip_ids.npy", allow_pickle=False)
    # The stream resamples shards, so a batch may hold a clip twice; both sides take column r as row r's own clip.
    assert sbert.shape == (8, 384) and clip_ids.shape == (8,)

    cfg = load_config(TrainConfig, run / "config.yaml")
    options = cfg.loss.options
    assert options.omega == 0.1
    (want,) = batch_target_stats(sbert, [8], options.omega, options.relevance)
    assert (want.batches, want.clips_dropped) == (1, 0)
    got = (step["target_own_mass"], step["target_entropy"], step["target_max_other"])
    assert got == pytest.approx((want.own_mass, want.entropy_nats, want.max_other), abs=1e-6)
    assert want.own_mass < 0.9 and want.entropy_nats > 0.1  # synthetic captions of one class are similar

    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("step 1/1 ")]
    for name, value in zip(("target_own_mass", "target_entropy", "target_max_other"), got):
        assert f"{name} {value:.4f}" in line
