"""`shards/build.py --plan`: the shipped configs/shards.yaml writes exactly the shard directories the paper configs
and the pipeline's evaluation read, with the paper's Sentence-BERT model, and a bad plan is refused before Ray
starts, naming the job. (Running a plan is the rehearsal's first stage: tests/integration/test_rehearsal.py.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from kit import REPO
from kit.miniature import lay_out

from launcher.config import load_pipeline
from relret.config import ConfigError, TrainConfig, load_config
from shards import job
from shards.plan import load_plan


@pytest.fixture
def in_miniature(tmp_path, shared_data):
    lay_out(tmp_path, shared_data)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def test_the_paper_plan_writes_what_the_paper_configs_read(in_miniature, mpnet_dir):
    plan = load_plan(REPO / "configs" / "shards.yaml")
    written = {f"{cfg.out}/{cfg.dataset}/{cfg.resolved_split()}" for cfg in plan.jobs}
    assert len(written) == len(plan.jobs) == 10
    assert {cfg.sbert for cfg in plan.jobs} == {"all-mpnet-base-v2"}
    read = set()
    for name in ("pretrain", "finetune_clotho", "finetune_audiocaps"):
        cfg = load_config(TrainConfig, REPO / "configs" / f"{name}.yaml")
        read |= {source.path for source in cfg.data.train} | set(cfg.data.val)
    pipeline = load_pipeline(REPO / "configs" / "pipeline.yaml")
    evaluation = " ".join(pipeline.stages["evaluate"].command)
    read |= set(re.findall(r"--shards (\S+)", evaluation))
    assert read <= written, read - written
    assert pipeline.stages["shard"].command[-2:] == ["--plan", "{repo}/configs/shards.yaml"]
    # Shard sizes follow the splits: 32 clips for Clotho and AudioCaps (readers of their own on 8 GPUs x 8 workers)
    sizes = {(cfg.dataset, cfg.resolved_split()): cfg.samples_per_shard for cfg in plan.jobs}
    assert sizes[("clotho", "development")] == sizes[("audiocaps", "train")] == 32
    wavcaps = [cfg for cfg in plan.jobs if cfg.dataset == "wavcaps"]
    assert [cfg.blacklist for cfg in wavcaps][0] == ["data/wavcaps/dcase2024_task6_excluded_freesound_ids.csv"]
    # WavCaps stored whole, so that pretraining crops a fresh 30 s window each epoch (the authors' setting)
    assert {cfg.max_duration_s for cfg in wavcaps} == {3600.0} and len(wavcaps) == 4


def _plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("jobs: []", "`jobs` must be a non-empty list"),
        ("commons: {}\njobs: [{dataset: clotho}]", "unknown key commons"),
        ("jobs: [{dataset: clotho_v2, captions: c.csv, audio_dir: a, out: o}]", r"jobs\[0\]: dataset 'clotho_v2'"),
        ("jobs: [{dataset: clotho, captions: c.csv, audio_dir: a}]", r"jobs\[0\]: out missing"),
        (
            "common: {out: o, audio_dir: a}\njobs: [{dataset: clotho, captions: c.csv, samples_per_shard: 0}]",
            r"jobs\[0\].*samples.per.shard",
        ),
        ("common: {out: o, audio_dir: a}\njobs: [{dataset: clotho, captions: c.csv, sbert_model: x}]", "sbert_model"),
        (
            "common: {out: o, audio_dir: a}\njobs: [{dataset: clotho, split: development, captions: missing.csv}]",
            r"jobs\[0\]: captions file missing.csv does not exist",
        ),
    ],
)
def test_a_bad_plan_is_refused_naming_the_job(tmp_path, monkeypatch, text, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.csv").write_text("file_name,caption_1\n")
    with pytest.raises(ConfigError, match=match):
        load_plan(_plan(tmp_path, text))


def test_two_jobs_writing_one_directory_and_an_uninstalled_model_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.csv").write_text("file_name,caption_1\n")
    twice = "common: {out: o, audio_dir: a, split: dev}\njobs: [{dataset: clotho, captions: c.csv}, " + (
        "{dataset: clotho, captions: c.csv}]"
    )
    with pytest.raises(ConfigError, match="several jobs write o/clotho/dev"):
        load_plan(_plan(tmp_path, twice))
    monkeypatch.setenv("RELRET_CACHE", str(tmp_path / "cache"))
    unknown = "common: {out: o, audio_dir: a, split: dev, sbert: all-mpnet-base-v2}\njobs: [{dataset: clotho, " + (
        "captions: c.csv}]"
    )
    assert job.main(["--plan", str(_plan(tmp_path, unknown))]) == 1
    assert "sbert install all-mpnet-base-v2" in capsys.readouterr().err
