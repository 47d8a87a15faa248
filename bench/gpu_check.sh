#!/usr/bin/env bash
# The GPU check for sessions lent a GPU machine (never CI): installs the wheels carried in
# .whl (DeepSpeed and what it needs beyond the machine's image), then bench/gpu_check.py
# (at most 7.5 min on one H200: see the time budget in gpu_check.py). Arguments go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONUNBUFFERED=1 python3 bench/gpu_check.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
