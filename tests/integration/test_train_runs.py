"""Real training runs of the tiny model: the deepspeed launcher with 2 CPU ranks, one process without launcher,
interruption by signals, resumption, --init-from, and loading a trained model for evaluation.

Every run is a subprocess of `relret/train.py`. Runs with a TCP rendezvous (the deepspeed launcher) live in a
network namespace of their own (`unshare -n`), so nothing listens outside it; single-process runs use a file store.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from kit.runs import (  # noqa: F401 (the run helpers this module's tests use)
    DEEPSPEED,
    RUN_TIMEOUT_S,
    TINY,
    TRAIN,
    _last_step,
    _latest_step,
    _launcher,
    _log,
    _poll,
    _records,
    _shm_buffers,
    _single,
    _status,
    _wait,
    _weights,
    stop_leftovers,
)  # fmt: skip
from kit.shards import read_samples_with_tarfile, truncate_shard, write_shard_dir

from relret import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _stop_leftovers():
    yield
    stop_leftovers()


@pytest.fixture(scope="module")
def can_unshare():
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("`unshare -n` is not permitted here; the launcher tests need a private network namespace")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run-shards")
    write_shard_dir(root / "train", n_clips=64, per_shard=4, durations_s=(1.0, 2.5, 4.0, 6.0), seed=1)
    write_shard_dir(root / "val", split="val", n_clips=16, per_shard=4, seed=2)
    write_shard_dir(root / "damaged", n_clips=48, per_shard=4, durations_s=(1.0, 2.5, 4.0, 6.0), seed=3)
    truncate_shard(root / "damaged" / "synth-train-000002.tar", 0.6)
    return root


def _data(shards: Path, train: str = "train", val: bool = True) -> list[str]:
    return [f"data.train=[{{path: {shards / train}}}]", f"data.val=[{shards / 'val'}]" if val else "data.val=[]"]


# ---------------------------------------------------------------------------------------------------------------------
# 2 ranks through the deepspeed launcher, interrupted by SIGUSR1 on one rank, resumed to completion


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory, shards, can_unshare) -> dict:
    run_dir = tmp_path_factory.mktemp("launched") / "run"
    overrides = _data(shards) + [
        "data.num_workers=1",
        "data.shuffle_buffer=16",
        "data.shuffle_initial=4",
        "data.samples_per_epoch=64",
        "train.epochs=4",
        "optim.warmup_epochs=0.25",
        "train.checkpoint_every_steps=100",
        "train.keep_checkpoints=1",
    ]
    first = _launcher(run_dir, overrides)
    _poll(lambda: _last_step(run_dir) >= 12, first, what="step 12")
    ranks = [
        p
        for p in psutil.Process(first.pid).children(recursive=True)
        if "deepspeed.launcher.launch" in " ".join(p.parent().cmdline())
    ]
    rank1 = [p for p in ranks if "--local_rank=1" in p.cmdline()]
    assert len(rank1) == 1, ranks
    shm_during = _shm_buffers(first)
    rank1[0].send_signal(signal.SIGUSR1)  # one rank only: every rank must still stop together
    rc_first = _wait(first)
    shm_after = _shm_buffers(first)
    status_first = _status(run_dir)
    latest_first = ckpt.read_pointer(run_dir, ckpt.LATEST)
    log_first = _log(run_dir)
    second = _launcher(run_dir, overrides)
    rc_second = _wait(second)
    shm_after += _shm_buffers(second)
    third = _single(run_dir.parent / "run", overrides)  # a completed run dir: says so and exits 0
    rc_third = _wait(third, timeout=60)
    return {
        "run_dir": run_dir,
        "rc": (rc_first, rc_second, rc_third),
        "status_first": status_first,
        "latest_first": latest_first,
        "log_first": log_first,
        "shm_during": shm_during,
        "shm_after": shm_after,
        "log": _log(run_dir),
    }


@pytest.mark.distributed
def test_two_rank_launcher_run_learns_and_writes_metrics(launched_run):
    """2 ranks x 4 through `deepspeed --num_gpus 2`: the loss falls from the first to the last epoch, every step is
    logged once (also across the interruption), validation ran every epoch, TensorBoard and best/latest exist."""
    run_dir = launched_run["run_dir"]
    assert launched_run["rc"][1] == 0
    status = _status(run_dir)
    assert (status["state"], status["step"], status["total_steps"]) == ("completed", 32, 32)
    train = _records(run_dir)
    assert [r["step"] for r in train] == list(range(1, 33))
    losses = np.array([r["loss"] for r in train])
    first, last = losses[:8].mean(), losses[-8:].mean()
    assert last < first - 0.1, (first, last)
    assert all(0 < r["samples_per_s"] and 0 <= r["data_wait"] <= 1 for r in train)
    val = _records(run_dir, "val")
    assert [r["step"] for r in val] == [8, 16, 24, 32]
    assert all(0 <= r["t2a/mAP@10"] <= 1 and r["val_clips"] == 16 and r["val_captions"] > 16 for r in val)
    best = ckpt.read_pointer(run_dir, ckpt.BEST)
    best_step = max(val, key=lambda r: r["t2a/mAP@10"])["step"]
    assert best == ckpt.tag_for_step(best_step)
    assert ckpt.step_tags(run_dir) == sorted({best, ckpt.tag_for_step(32)})  # keep_checkpoints=1, plus the best
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").read_text() == (run_dir / ckpt.CHECKPOINTS / best / "config.yaml").read_text()


@pytest.mark.distributed
def test_launcher_runs_leave_no_deepspeed_shm_buffers(launched_run):
    """DeepSpeed's CPU backend maps a 66 MB /dev/shm allreduce buffer per rank while the run lasts; after the run, the
    interrupted one and its resumption alike, none is left behind."""
    assert len(launched_run["shm_during"]) == 2
    assert launched_run["shm_after"] == []


@pytest.mark.distributed
def test_sigusr1_on_one_rank_checkpoints_every_rank_and_exits_75(launched_run):
    """SIGUSR1 to rank 1 alone: both ranks stop at the same step boundary after a complete checkpoint holding both
    ranks' state, status.json says interrupted, the launcher exits 75, and the rerun resumes from there."""
    assert launched_run["rc"][0] == 75
    status = launched_run["status_first"]
    assert status["state"] == "interrupted"
    assert status["checkpoint"] == launched_run["latest_first"]
    assert ckpt.step_of_tag(status["checkpoint"]) == status["step"] >= 12
    assert "received SIGUSR1" in launched_run["log_first"]
    assert f"interrupted: checkpoint {status['checkpoint']} written" in launched_run["log_first"]
    assert f"resumed from {status['checkpoint']}" in launched_run["log"]


@pytest.mark.distributed
def test_completed_run_dir_exits_zero_at_once(launched_run):
    """Starting again on a completed run directory says so and exits 0 without training."""
    assert launched_run["rc"][2] == 0
    assert "already completed at step 32" in launched_run["log"]


@pytest.mark.distributed
def test_load_model_reproduces_the_best_validation_metrics(launched_run, shards):
    """`load_model(run_dir)` (no DeepSpeed) gives, on the validation shards read with tarfile, the t2a/a2t metrics
    that validation recorded for the best checkpoint."""
    from relret.checkpoint import load_model
    from relret.metrics import retrieval_metrics_from_embeddings

    run_dir = launched_run["run_dir"]
    model, cfg = load_model(run_dir)
    best_step = ckpt.step_of_tag(ckpt.read_pointer(run_dir, ckpt.BEST))
    recorded = next(r for r in _records(run_dir, "val") if r["step"] == best_step)
    clips, clip_ids, captions, caption_ids = [], [], [], []
    for sample in read_samples_with_tarfile(shards / "val"):
        clips.append(sample.audio[: int(cfg.data.val_crop_s * 32000)])
        clip_ids.append(sample.meta.clip_id)
        captions += sample.meta.captions
        caption_ids += [sample.meta.clip_id] * len(sample.meta.captions)
    with torch.no_grad():
        audio_emb = torch.cat(
            [model.encode_audio(torch.from_numpy(c)[None], torch.tensor([len(c)]), normalize=True) for c in clips]
        )
        text_emb = model.encode_text(captions, normalize=True)
    ids, cap_ids = torch.tensor(clip_ids), torch.tensor(caption_ids)
    t2a = retrieval_metrics_from_embeddings(text_emb, audio_emb, cap_ids, ids)
    a2t = retrieval_metrics_from_embeddings(audio_emb, text_emb, ids, cap_ids)
    for name in ("mAP@10", "R@1", "R@5", "R@10"):
        assert t2a[name] == pytest.approx(recorded[f"t2a/{name}"], abs=1e-6)
        assert a2t[name] == pytest.approx(recorded[f"a2t/{name}"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# One step: 2 ranks x 4 against 1 rank x 8


@pytest.mark.distributed
def test_one_step_of_two_ranks_by_four_equals_one_rank_by_eight(tmp_path, shards, can_unshare):
    """The same 8 samples (shards of 4, no shuffling, no dropout) as 2 ranks x 4 via the launcher and as 1 process
    x 8 without launcher: the same step-1 loss and updated weights, to float32 reduction order; the step moved them."""
    from relret.config import TrainConfig, load_config
    from relret.models import build_model

    overrides = _data(shards, val=False) + [
        "data.num_workers=1",
        "data.shuffle_buffer=1",
        "data.shuffle_initial=1",
        "data.samples_per_epoch=8",
        "train.epochs=1",
        "optim.warmup_epochs=0",
        "optim.min_lr=1.0e-3",  # a one-step schedule's only update is its last: at min_lr
        "model.text.dropout=0",  # dropout masks are drawn per rank: the same samples would see other masks
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    assert _wait(_launcher(two, overrides)) == 0, _log(two)
    assert _wait(_single(one, overrides)) == 0, _log(one)
    assert "world 2 | micro-batch 4" in _log(two) and "world 1 | micro-batch 8" in _log(one)
    loss_two, loss_one = _records(two)[0]["loss"], _records(one)[0]["loss"]
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    w_two, w_one = _weights(two / "checkpoints" / "step-00000001"), _weights(one / "checkpoints" / "step-00000001")
    cfg = load_config(TrainConfig, TINY, overrides)
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    moved = max((w_one[k] - init[k]).abs().max().item() for k in w_one)
    assert moved > 1e-4
    for key in w_one:
        torch.testing.assert_close(w_two[key], w_one[key], rtol=1e-4, atol=2e-6, msg=key)


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM, then SIGKILL, then completion: the same weights as an uninterrupted run


def test_sigterm_and_sigkill_resume_to_the_uninterrupted_weights(tmp_path, shards):
    """One process, 2 DataLoader workers, shuffling, a truncated shard: a run stopped by SIGTERM (exit 75 after a
    checkpoint at the step it stopped), restarted, killed with SIGKILL after its next checkpoint, and restarted
    again ends with bit-identical weights and the same per-step losses as an uninterrupted run."""
    overrides = _data(shards, train="damaged") + [
        "data.num_workers=2",
        "data.shuffle_buffer=8",
        "data.shuffle_initial=4",
        "data.samples_per_epoch=48",
        "train.epochs=3",
        "train.checkpoint_every_steps=4",
        "train.keep_checkpoints=2",
    ]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert _wait(_single(straight, overrides)) == 0, _log(straight)

    first = _single(broken, overrides)
    _poll(lambda: _last_step(broken) >= 3, first, what="step 3")
    first.send_signal(signal.SIGTERM)
    assert _wait(first) == 75, _log(broken)
    status = _status(broken)
    assert status["state"] == "interrupted"
    stopped = status["step"]
    assert status["checkpoint"] == ckpt.tag_for_step(stopped) == ckpt.read_pointer(broken, ckpt.LATEST)
    assert _last_step(broken) == stopped  # the checkpoint is at the step where it stopped
    assert ckpt.read_state(broken / "checkpoints" / status["checkpoint"])["step"] == stopped

    second = _single(broken, overrides)
    _poll(lambda: _latest_step(broken) > stopped, second, what="a checkpoint after the resumption")
    os.killpg(second.pid, signal.SIGKILL)
    assert _wait(second) == -signal.SIGKILL
    assert _latest_step(broken) < 18

    third = _single(broken, overrides)
    assert _wait(third) == 0, _log(broken)
    assert "resumed from" in _log(broken)
    a, b = _weights(straight / "checkpoints" / "step-00000018"), _weights(broken / "checkpoints" / "step-00000018")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _records(straight), _records(broken)
    assert [r["step"] for r in rb] == list(range(1, 19))
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]
    assert [r["t2a/mAP@10"] for r in _records(broken, "val")] == [r["t2a/mAP@10"] for r in _records(straight, "val")]
    assert ra[-1]["damaged_shards"] == rb[-1]["damaged_shards"] >= 1  # the truncated shard was read and counted
    assert "WARNING: skipping damaged shard data" in _log(straight)


# ---------------------------------------------------------------------------------------------------------------------
# --init-from, and bf16 autocast on CPU


@pytest.mark.distributed
def test_init_from_loads_weights_and_the_runs_own_checkpoint_wins_on_resume(tmp_path, shards, launched_run):
    """--init-from RUN starts from RUN's best (else latest) model weights with a new optimizer and schedule; it is
    recorded in status.json and config.yaml; a restarted fine-tuning run resumes from its own checkpoint even when
    --init-from now names something else."""
    base = launched_run["run_dir"]
    base_ckpt = (base / "checkpoints" / ckpt.read_pointer(base, ckpt.BEST)).resolve()

    tune = tmp_path / "tune"
    overrides = _data(shards, val=False) + [
        "data.samples_per_epoch=8",
        "train.epochs=3",
        "train.checkpoint_every_steps=1",
        "optim.lr=1.0e-9",
        "optim.min_lr=0",
    ]
    first = _single(tune, overrides, init_from=str(base))
    _poll(lambda: _latest_step(tune) >= 1, first, what="the first checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    _wait(first)
    assert _status(tune)["init_from"] == str(base_ckpt)
    assert f"init_from: {base_ckpt}" in (tune / "config.yaml").read_text()
    start = _weights(tune / "checkpoints" / "step-00000001")
    reference = _weights(base_ckpt)
    for key in reference:  # lr 1e-9: one step barely moves the loaded weights
        torch.testing.assert_close(start[key], reference[key], rtol=0, atol=1e-7)

    second = _single(tune, overrides, init_from=str(tmp_path / "does-not-exist"))
    assert _wait(second) == 0, _log(tune)
    assert "resumed from" in _log(tune)
    assert _status(tune)["init_from"] == str(base_ckpt)


def test_bf16_autocast_path_runs_and_saves_float32(tmp_path, shards):
    """train.precision=bf16 (what GPUs use) runs on CPU autocast: finite losses, float32 weights in the checkpoint."""
    run = tmp_path / "bf16"
    overrides = _data(shards, val=False) + ["data.samples_per_epoch=16", "train.epochs=1", "train.precision=bf16"]
    assert _wait(_single(run, overrides)) == 0, _log(run)
    assert "bf16 autocast on cpu" in _log(run)
    assert all(np.isfinite(r["loss"]) for r in _records(run))
    weights = _weights(run / "checkpoints" / "step-00000002")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_failure_exits_1_with_status_failed(tmp_path, shards):
    """A failure during training (validation shards that are all garbage) exits 1 and leaves status "failed" with
    the reason, and no checkpoint pointer."""
    bad_val = tmp_path / "val"
    write_shard_dir(bad_val, split="val", n_clips=8, per_shard=4, seed=5)
    for shard in bad_val.glob("*.tar"):
        shard.write_bytes(b"not a tar file" * 100)
    run = tmp_path / "fails"
    overrides = [f"data.train=[{{path: {shards / 'train'}}}]", f"data.val=[{bad_val}]", "data.samples_per_epoch=8"]
    assert _wait(_single(run, overrides + ["train.epochs=1"])) == 1
    status = _status(run)
    assert status["state"] == "failed" and "validation shards gave no readable clip" in status["message"]
    assert status["checkpoint"] is None and ckpt.read_pointer(run, ckpt.LATEST) is None
