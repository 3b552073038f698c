#!/usr/bin/env bash
# The tiny training with the KTransformers backend on a CUDA host: build/gpu-wheels (make gpu-wheels)
# first, then kt-kernel, transformers-kt and accelerate-kt over them, as KTransformers' SFT guide
# installs them. Those wheels (~290 MB, make gpu-kt-wheels) arrive as tar parts under build/ktgpu/p*/
# (one transfer each); their SHA256SUMS is checked before anything is installed.
#   bash e2e/gpu/run_kt.sh OUT_DIR [STEPS [SIZE]]   (SIZE: kt, the default, or small)
set -euo pipefail
out=${1:?output directory}
steps=${2:-20}
size=${3:-kt}
here=$(cd "$(dirname "$0")/../.." && pwd)
wheels=$(mktemp -d)
cat "$here"/build/ktgpu/p*/kt.tar.* | tar -C "$wheels" -xf -
(cd "$wheels" && sha256sum -c SHA256SUMS)
lib=$(mktemp -d)
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$lib" \
  "$here"/build/gpu-wheels/*.whl
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade --target "$lib" \
  "$wheels"/*.whl
export PYTHONPATH="$lib${PYTHONPATH:+:$PYTHONPATH}"
grep -o -w -E 'amx_[a-z0-9]+|avx512_bf16|avx512_vnni|avx512bw' /proc/cpuinfo | sort -u | tr '\n' ' ' > "$out/cpu.txt"
python3 "$here/e2e/gpu/tiny_train.py" --device cuda --kt --size "$size" --work "$(mktemp -d)" \
  --steps "$steps" --summary "$out/summary-cuda-kt-$size.json"
