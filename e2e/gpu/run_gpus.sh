#!/usr/bin/env bash
# One GPU against two, with and without the KTransformers backend, on a host with two CUDA GPUs:
# the tiny training (e2e/gpu/tiny_train.py, the training pod's own command) on the small
# DeepSeek-V3-shaped model, each configuration with nvidia-smi sampling every GPU's memory and use.
# Needs build/gpu-wheels (make gpu-wheels) and, for the KT set, build/ktgpu/p*/ (make
# gpu-kt-wheels, one part per transfer), as run.sh and run_kt.sh do.
#   bash e2e/gpu/run_gpus.sh OUT_DIR plain|plain-image|kt [STEPS [SIZE]]
# plain is LLaMA-Factory's own stack; plain-image is plain LoRA on the trainer image's stack (the KT
# wheels installed, use_kt off), where accelerate-kt's FSDP2 loading replaces accelerate 1.11's.
# ONE_PROCESS=0 leaves out the configuration of one process that sees both GPUs (the old pod).
# Each set leaves OUT_DIR/gpus-SET.tar.gz (summaries, logs, samples, table), rewritten after every
# configuration so that a run cut short still returns what it did.
set -euo pipefail
dest=${1:?output directory}
set=${2:?plain, plain-image or kt}
steps=${3:-20}
size=${4:-small}
here=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mktemp -d)
lib=$(mktemp -d)
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$lib" \
  "$here"/build/gpu-wheels/*.whl
extra=""
if [[ $set == kt || $set == plain-image ]]; then
  wheels=$(mktemp -d)
  cat "$here"/build/ktgpu/p*/kt.tar.* | tar -C "$wheels" -xf -
  (cd "$wheels" && sha256sum -c --quiet SHA256SUMS)
  python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade --target "$lib" \
    "$wheels"/*.whl
  [[ $set == kt ]] && extra="--kt"
  # As the rendered Job does from the pod's CPU limit: kt-kernel's expert pool, not its default.
  export ACCELERATE_KT_NUM_THREADS=${ACCELERATE_KT_NUM_THREADS:-$(nproc)}
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader > "$out/gpus.txt"
nvidia-smi topo -m > "$out/topo.txt" 2>&1 || true
grep -o -w -E 'amx_[a-z0-9]+|avx512_bf16|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ' > "$out/cpu.txt" || true

# name  CUDA_VISIBLE_DEVICES  processes  timeout. The last is what the pod did before it launched one
# process per GPU: one process that sees both GPUs (expected to fail).
configs=(
  "$set-2gpu 0,1 2 150"
  "$set-1gpu 0 1 100"
)
[[ ${ONE_PROCESS:-1} == 0 ]] || configs+=("$set-2gpu-1process 0,1 1 45")
status=0
for config in "${configs[@]}"; do
  read -r name devices processes limit <<<"$config"
  nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv,noheader,nounits \
    -lms 200 > "$out/smi-$name.csv" &
  sampler=$!
  started=$(date +%s)
  if CUDA_VISIBLE_DEVICES=$devices PYTHONPATH="$lib${PYTHONPATH:+:$PYTHONPATH}" timeout "$limit" \
      python3 "$here/e2e/gpu/tiny_train.py" --device cuda --size "$size" --steps "$steps" --processes "$processes" \
      --work "$(mktemp -d)" --summary "$out/summary-$name.json" $extra > "$out/log-$name.txt" 2>&1; then
    echo "$name ok in $(( $(date +%s) - started )) s"
  else
    echo "$name FAILED after $(( $(date +%s) - started )) s"
    grep -E "Error|error" "$out/log-$name.txt" | tail -n 4 || true
    [[ $name == *-1process ]] || status=1
  fi
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  python3 "$here/e2e/gpu/gpu_table.py" "$out" > "$out/table.md"
  tar -C "$out" -czf "$dest/gpus-$set.tar.gz" .
done
cat "$out/table.md"
exit $status
