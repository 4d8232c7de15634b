"""bench/device/run.sh, the GPU check for a lent H200, run here with this machine's Python standing in for the
image's: it installs the carried wheels into its site directory, runs bench/gpu.py with the carried tokenizer
directory and bench/attention.py, and writes their output under $OUT."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _probe_wheel(directory: Path) -> Path:
    """A one-module pure-Python wheel, standing in for the carried ones (no package index in tests)."""
    name, version = "relret_device_probe", "1.0"
    files = {
        f"{name}/__init__.py": b"CARRIED = True\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = (
        "".join(
            f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
            for path, data in files.items()
        )
        + f"{name}-{version}.dist-info/RECORD,,\n"
    )
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return wheel


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_run_sh_installs_the_wheels_and_writes_both_benchmarks(tmp_path):
    root = tmp_path / "repo"
    (root / ".device" / "whl").mkdir(parents=True)
    (root / "bench").symlink_to(REPO / "bench")
    _probe_wheel(root / ".device" / "whl")
    from relret.sbert import default_sbert_path

    tokenizer = root / ".device" / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(Path(default_sbert_path()) / name, tokenizer / name)
    bin_dir, out, site = tmp_path / "bin", tmp_path / "out", tmp_path / "site"
    bin_dir.mkdir()
    _stub(bin_dir, "python3", f'exec {sys.executable} "$@"')
    _stub(bin_dir, "nvidia-smi", 'echo "name, memory.total [MiB]"; echo "stub GPU, 1 MiB"')
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        OUT=str(out),
        RELRET_DEVICE_SITE=str(site),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),  # run.sh sets PYTHONPATH to the site; relret comes from bench's sys.path
    )
    proc = subprocess.run(
        ["bash", "bench/device/run.sh", "--gpu-path-on-cpu", "--skip-loader"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (site / "relret_device_probe" / "__init__.py").is_file()
    assert "stub GPU, 1 MiB" in (out / "device.txt").read_text()
    gpu = (out / "gpu.txt").read_text()
    assert "bench/gpu.py on cpu" in gpu and "train fp32, fused attention" in gpu, gpu[-2000:]
    attention = (out / "attention.txt").read_text()
    assert "no CUDA here" in attention, attention[-2000:]


def test_run_sh_without_the_carried_folder_says_what_to_do(tmp_path):
    (tmp_path / "bench").symlink_to(REPO / "bench")
    proc = subprocess.run(
        ["bash", "bench/device/run.sh"],
        cwd=tmp_path,
        env=dict(os.environ, OUT=str(tmp_path / "out")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "run bench/device/prepare.sh here and carry .device" in proc.stderr
