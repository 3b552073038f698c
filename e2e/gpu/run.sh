#!/usr/bin/env bash
# On a CUDA host whose Python already has torch (built for its driver): install what
# requirements/gpu-host.txt lists from build/gpu-wheels (make gpu-wheels; no network needed there)
# into a directory put ahead of that Python's own packages, then run the tiny training on the GPU.
# (A --system-site-packages venv would not see them when that Python is itself a venv.)
#   bash e2e/gpu/run.sh OUT_DIR [STEPS [SIZE]]
set -euo pipefail
out=${1:?output directory}
steps=${2:-40}
size=${3:-tiny}
here=$(cd "$(dirname "$0")/../.." && pwd)
lib=$(mktemp -d)
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$lib" \
  "$here"/build/gpu-wheels/*.whl
export PYTHONPATH="$lib${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
python3 "$here/e2e/gpu/tiny_train.py" --device cuda --work "$(mktemp -d)" --steps "$steps" \
  --size "$size" --summary "$out/summary-cuda-$size.json"
