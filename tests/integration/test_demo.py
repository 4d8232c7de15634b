"""The embedded run (`make demo`) at the test suite's size: the same code path as the full demo (synth corpus, Ray
shard job with the real MiniLM, launcher local mode with DeepSpeed on 2 CPU ranks, evaluate, report), fewer clips
and epochs. About three minutes on a 2-core machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import binomtest

from relret.captions import read_caption_table
from relret.demo import METHODS, held_out_search, stage
from relret.index import AudioIndex
from relret.retrieval import RetrievalModel

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.ray]


def run_demo(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "relret", "demo", "--size", "ci", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run_demo(out)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    return out, proc


def test_demo_runs_every_stage_and_writes_the_report(demo):
    out, proc = demo
    report = out / "report"
    for name in ("README.md", "table2.md", "table2.json", "ttest.json", "summary.json", "searches.md"):
        assert (report / name).stat().st_size > 0, name
    for png in ("training_curves.png", "relevance.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # Every stage ran through the launcher and completed; fine-tuning started from its own pretraining.
    for method in METHODS:
        finetune = json.loads((out / stage("finetune", method, 0) / "status.json").read_text())
        assert finetune["state"] == "completed"
        assert Path(finetune["init_from"]).parent.parent == out / stage("pretrain", method, 0)
        evaluation = json.loads((out / stage("evaluate", method, 0) / "eval.json").read_text())
        assert evaluation["info"]["n_clips"] == 80 and evaluation["info"]["n_captions"] == 400
        assert (out / stage("evaluate", method, 0) / "dcase_submission.csv").is_file()
    # Real SBERT embeddings in the shards (the MiniLM model: 384 dimensions).
    manifest = json.loads((out / "shard" / "clotho" / "development" / "manifest.json").read_text())
    assert manifest["sbert_dim"] == 384 and manifest["total_samples"] == 160
    # The table has both methods, and the printed table is the saved one.
    table = (report / "table2.md").read_text()
    assert all(f"| {method} | 1 |" in table for method in METHODS)
    assert table.splitlines()[0] in proc.stdout
    tests = json.loads((report / "ttest.json").read_text())
    assert set(tests) == {"seed0/t2a", "seed0/a2t"} and all(0 <= t["p"] <= 1 for t in tests.values())


def test_search_finds_held_out_captions_clips_more_often_than_chance(demo):
    """Stated margin: over every caption of the 80 held-out clips, the clip is in the top 10 at least 1.5 times as
    often as chance (10/80), and, counting one caption per clip (independent queries), a one-sided binomial test
    against chance gives p < 0.01."""
    out, _ = demo
    report = out / "report"
    captions = read_caption_table(out / "corpus" / "clotho" / "clotho_captions_evaluation.csv")
    assert len(captions) == 80
    index, model = AudioIndex.load(report / "index"), RetrievalModel.from_pretrained(report / "model")
    result = held_out_search(index, model, captions)
    assert result["chance"] == pytest.approx(10 / 80)
    assert result["rate"] >= 1.5 * result["chance"], result
    first = held_out_search(index, model, {name: texts[:1] for name, texts in captions.items()})
    assert binomtest(first["hits"], first["queries"], first["chance"], alternative="greater").pvalue < 0.01, first
    # The report's number is this one.
    assert json.loads((report / "summary.json").read_text())["held_out_search"] == result

    # The command-line search gives the same top 10 as the function above, for a few held-out captions.
    names = sorted(captions)[:3]
    queries = [captions[name][0] for name in names]
    proc = subprocess.run(
        [sys.executable, "-m", "relret", "search", "--index", str(report / "index"), "-k", "10", *queries],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = re.findall(r"^\s+\d+\.\s+[-\d.]+\s+(\S+)$", proc.stdout, flags=re.M)
    assert len(listed) == 30
    per_query = held_out_search(index, model, {name: [captions[name][0]] for name in names})
    in_top = [name in listed[10 * i : 10 * i + 10] for i, name in enumerate(names)]
    assert sum(in_top) == per_query["hits"]


def test_demo_run_again_skips_completed_stages(demo):
    out, _ = demo
    before = (out / "report" / "table2.md").read_text()
    proc = run_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = re.findall(r"^\[(\w+)\] completed in .*; skipped$", proc.stdout, flags=re.M)
    assert set(skipped) == {"corpus", "shard"} | {stage(k, m, 0) for k in ("pretrain", "finetune", "evaluate")
                                                   for m in METHODS}  # fmt: skip
    assert (out / "report" / "table2.md").read_text() == before
