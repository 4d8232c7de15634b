#!/usr/bin/env bash
# There, on the lent H200, from the repo's root (the device tool's `run` with carry [".device"], after
# bench/device/prepare.sh here): the carried wheels into /tmp/site (or $RELRET_DEVICE_SITE), then bench/gpu.py's
# table and bench/attention.py's CUDA rows, each printed and written under $OUT (gpu.txt, attention.txt, device.txt).
# Arguments go to bench/gpu.py. Meant to end within about 8 minutes (the tool allows 10 per command): run it with
# timeout_s 560.
set -uo pipefail
out=${OUT:-/tmp/relret-device}
mkdir -p "$out"
if [ ! -d .device/whl ] || [ ! -d .device/tokenizer ]; then
    echo "bench/device/run.sh: no .device/: run bench/device/prepare.sh here and carry .device" >&2
    exit 1
fi
site=${RELRET_DEVICE_SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .device/whl/*.whl || exit 1
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1  # relret from this checkout: it is not installed there
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    nproc
    python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__)'
} 2>&1 | tee "$out/device.txt"
status=0
timeout 330 python3 bench/gpu.py --tokenizer .device/tokenizer "$@" 2>&1 | tee "$out/gpu.txt" || status=1
timeout 150 python3 bench/attention.py --no-memory --rounds 3 2>&1 | tee "$out/attention.txt" || status=1
exit $status
