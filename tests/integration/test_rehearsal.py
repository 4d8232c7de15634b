"""The rehearsal of the paper's pipeline on the datasets' real layouts: the shipped configs/pipeline.yaml, run by the
launcher's local mode on a miniature copy of Clotho, AudioCaps and WavCaps laid out as users get them
(tests/kit/miniature.py), with the real all-mpnet-base-v2. Only the rehearsal overrides below change the run (the
README lists them): the data root (the directory the launcher runs in), the model's size, the epochs, the batch and
the resources of this machine. Everything else (the shard commands, the datasets' layouts and limits, the paper
configs' settings, the evaluation commands) is what a cluster user runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kit import REPO
from kit.miniature import lay_out

from relret.config import load_saved_config
from relret.data import steps_per_epoch
from relret.run_dir import CONFIG_FILE, METRICS_FILE

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.ray]

MODEL_SIZE = [
    # The tiny dual encoder of configs/tiny_base.yaml in place of PaSST-S + RoBERTa-large (no weights offline here)
    "model.audio.weights=null",
    "model.audio.embed_dim=32",
    "model.audio.depth=1",
    "model.audio.num_heads=2",
    "model.audio.window_s=2.0",
    "model.audio.input_tdim=198",
    "model.audio.s_patchout_t=3",  # patchout kept, scaled to the 12 x 8 patches of a 2 s window
    "model.audio.s_patchout_f=2",
    "model.text.tokenizer=minilm",
    "model.text.random_init=true",
    "model.text.hidden_size=32",
    "model.text.num_layers=1",
    "model.text.num_heads=2",
    "model.text.intermediate_size=64",
    "model.embed_dim=32",
    "data.crop_s=2.0",  # the stand-in clips are 2 s long
    "data.val_crop_s=2.0",
]
EPOCHS = ["train.epochs=1"]
BATCH = ["train.global_batch_size=16", "data.val_batch_size=16"]
RESOURCES = ["train.precision=fp32", "data.num_workers=1"]  # no GPU: fp32 on CPU; 2 cores
REHEARSAL_OVERRIDES = [
    "local_ranks=2",
    "overrides=[" + ", ".join(MODEL_SIZE + EPOCHS + BATCH + RESOURCES) + "]",
]
"""The only changes to configs/pipeline.yaml; the data root is the launcher's working directory (its paths are
relative: data/...)."""


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, shared_data, mpnet_dir):
    root = tmp_path_factory.mktemp("rehearsal")
    mini = lay_out(root, shared_data)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher",
            "pipeline",
            "--config",
            str(REPO / "configs" / "pipeline.yaml"),
            "--local",
            *REHEARSAL_OVERRIDES,
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return mini, root, proc


def _manifest(root: Path, dataset: str, split: str) -> dict:
    return json.loads((root / "data" / "shards" / dataset / split / "manifest.json").read_text(encoding="utf-8"))


def test_every_stage_of_the_shipped_pipeline_completes(rehearsal):
    mini, root, proc = rehearsal
    assert proc.returncode == 0, (proc.stdout[-6000:], proc.stderr[-6000:])
    for stage in ("shard", "pretrain", "finetune_clotho", "finetune_audiocaps", "evaluate"):
        status = json.loads((root / "runs" / "pipeline" / stage / "status.json").read_text(encoding="utf-8"))
        assert status["state"] == "completed", stage
        assert f"[{stage}] completed" in proc.stdout


def test_shards_hold_mpnet_vectors_and_list_what_was_left_out(rehearsal):
    mini, root, proc = rehearsal
    for dataset, split in [
        *(("clotho", s) for s in mini.clotho),
        *(("audiocaps", s) for s in mini.audiocaps),
        *(("wavcaps", s) for s in ("freesound", "bbc", "soundbible", "audioset_sl")),
    ]:
        manifest = _manifest(root, dataset, split)
        assert (manifest["sbert_dim"], Path(manifest["sbert_model"]).name) == (768, "all-mpnet-base-v2"), split
    for split, n in mini.clotho.items():
        manifest = _manifest(root, "clotho", split)
        assert manifest["total_samples"] == n and manifest["config"]["skipped_missing_audio"] == 0
    for split, n in mini.audiocaps.items():
        config = _manifest(root, "audiocaps", split)["config"]
        missing = sorted(config["missing_audio"])
        assert missing == mini.audiocaps_missing[split], split
        corrupt = [c for c in mini.audiocaps_corrupt if split == "train"]
        # skipped_bad_input counts every clip left out, the missing ones among them
        assert (config["skipped_missing_audio"], config["skipped_bad_input"]) == (len(missing), len(missing + corrupt))
        assert _manifest(root, "audiocaps", split)["total_samples"] == n - len(missing) - len(corrupt)
    skipped = {s["source"]: s["reason"] for s in _manifest(root, "audiocaps", "train")["skipped"]}
    assert "audio file not found" in skipped[mini.audiocaps_missing["train"][0]]
    assert "audio file not found" not in skipped[mini.audiocaps_corrupt[0]]
    freesound = _manifest(root, "wavcaps", "freesound")
    assert freesound["config"]["blacklisted"] == len(mini.wavcaps_excluded)
    assert freesound["total_samples"] == mini.wavcaps["fsd"] - len(mini.wavcaps_excluded)
    assert "unpacked/mnt/fast/nobackup" in freesound["config"]["audio_root"]  # found where the zips unpack


def test_training_stages_ran_the_paper_configs_with_mpnet_and_caption_epochs(rehearsal):
    mini, root, proc = rehearsal
    for stage in ("pretrain", "finetune_clotho", "finetune_audiocaps"):
        run_dir = root / "runs" / "pipeline" / stage
        cfg = load_saved_config(run_dir / CONFIG_FILE)
        # The paper's settings came through untouched (configs/paper_base.yaml), only the rehearsal's changed.
        assert (cfg.data.sbert_dim, cfg.data.epoch_unit, cfg.train.epochs) == (768, "caption", 1), stage
        assert (cfg.model.text.hidden_dropout, cfg.optim.grad_clip, cfg.optim.decay_end_epoch) == (0.2, None, 20.0)
        assert (cfg.model.audio.fmax, cfg.model.audio.fmax_aug_range, cfg.loss.name) == (15000.0, 2000, "listnet")
    # A Clotho epoch is every caption once: clips x 5 samples.
    metrics = (root / "runs" / "pipeline" / "finetune_clotho" / METRICS_FILE).read_text(encoding="utf-8")
    steps = [r["step"] for r in map(json.loads, metrics.splitlines()) if r.get("kind", "train") == "train"]
    assert steps == list(range(1, steps_per_epoch(mini.clotho["development"] * 5, 16) + 1))
    assert re.search(rf"\b{len(steps)} steps/epoch x 1 epochs", proc.stdout.split("[finetune_clotho]")[1])
    finetune = json.loads((root / "runs" / "pipeline" / "finetune_clotho" / "status.json").read_text())
    assert Path(finetune["init_from"]).parent.parent == root / "runs" / "pipeline" / "pretrain"


def test_evaluation_reports_how_many_official_test_clips_it_evaluated(rehearsal):
    mini, root, proc = rehearsal
    evaluate = root / "runs" / "pipeline" / "evaluate"
    clotho = json.loads((evaluate / "clotho" / "eval.json").read_text(encoding="utf-8"))
    assert clotho["info"]["coverage"] == {
        "listed": mini.clotho["evaluation"],
        "evaluated": mini.clotho["evaluation"],
        "missing_audio": 0,
        "unreadable": 0,
        "excluded": 0,
    }
    assert (evaluate / "clotho" / "dcase_submission.csv").is_file()
    audiocaps = json.loads((evaluate / "audiocaps" / "eval.json").read_text(encoding="utf-8"))
    n_test, n_missing = mini.audiocaps["test"], len(mini.audiocaps_missing["test"])
    assert audiocaps["info"]["coverage"]["listed"] == n_test and n_missing == 1
    assert audiocaps["info"]["coverage"]["evaluated"] == audiocaps["info"]["n_clips"] == n_test - n_missing
    line = f"evaluated {n_test - n_missing:,} of the {n_test:,} clips the metadata lists (1 missing audio)"
    assert line in proc.stdout
    assert line[1:] in (evaluate / "audiocaps" / "metrics.md").read_text(encoding="utf-8")
