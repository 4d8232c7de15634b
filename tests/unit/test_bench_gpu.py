"""bench/gpu.py: one line and exit 0 without CUDA; its whole code path on CPU at toy sizes with --gpu-path-on-cpu."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_no_cuda_prints_one_line_and_exits_0():
    """Without a CUDA device the benchmark says so in one line and succeeds."""
    proc = _run()
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "no CUDA device" in lines[0]


def test_gpu_path_on_cpu_prints_the_table():
    """--gpu-path-on-cpu runs every row on CPU and prints the table's header and all its rows."""
    proc = _run("--gpu-path-on-cpu")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "bench/gpu.py on cpu (unknown peak)" in out
    header = next(line for line in out.splitlines() if line.startswith("row "))
    for column in ("rate", "ms", "TFLOP/s", "MFU", "peak GiB", "note"):
        assert column in header
    rows = [line for line in out.splitlines() if line.startswith(("train ", "loader ", "faiss "))]
    assert len(rows) == 5, out
    assert rows[0].startswith("train fp32, hear21passt attention")
    assert rows[1].startswith("train fp32, fused attention") and "x hear21passt attention" in rows[1]
    for row in rows[:2]:
        samples_per_s = float(row.split("samples/s")[0].split()[-1])
        assert samples_per_s > 0
    assert rows[2].startswith("loader clotho-shaped, 1 worker(s)") and "samples/s of the fastest step" in rows[2]
    assert rows[3].startswith("loader wavcaps-shaped, 1 worker(s)")
    for row in rows[2:4]:
        assert float(row.split("clips/s")[0].split()[-1]) > 0
    assert rows[4].startswith("faiss flat 2,000 x 64, 50 queries") and "faiss-cpu again" in rows[4]
