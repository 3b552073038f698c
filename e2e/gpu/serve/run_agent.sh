#!/usr/bin/env bash
# On the GPU machine, from the repo root: the operator's adapter agent against the real SGLang
# engine (0.5.16, the pack shared/gpu/sglang_build_pack.sh leaves in build/sglang-pack, sent along
# with the working tree as it is git-ignored). Unpacks SGLang into /tmp/site, builds a tiny Llama
# and its adapters with the image's own torch/transformers/peft, then runs agent_vs_sglang.py, which
# starts, kills and restarts the engine and writes OUT_DIR/results.json and the engine's logs.
#   bash e2e/gpu/serve/run_agent.sh OUT_DIR
# Env: PACK (default build/sglang-pack), TOK_DIR (default build/tiny-tokenizer, else made here),
#      BUDGET_S (default 420: no new section of the driver starts after it),
#      HEALTH_GENERATION (default off: SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false for the engine,
#      as the operator's engine pods have it; on: SGLang's default, /health generates).
set -uo pipefail
O=${1:?output directory}; mkdir -p "$O"
exec > >(tee -a "$O/run.log") 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HERE=$(cd "$(dirname "$0")" && pwd)
PACK=${PACK:-build/sglang-pack} SITE=/tmp/site W=/tmp/agent-vs-sglang START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }

stamp unpack
bash "$PACK/bin/sglang_unpack.sh" "$PACK" "$SITE" || exit 1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -V; echo "CUDA_HOME=$CUDA_HOME"
  python3 -c 'import importlib.util as u; print("image pydantic:", u.find_spec("pydantic") is not None)'
  PYTHONPATH=operator:$SITE python3 -c 'import pydantic; print("pydantic", pydantic.VERSION, pydantic.__file__)'
} > "$O/env.txt" 2>&1; cat "$O/env.txt"

stamp tiny model
rm -rf "$W"; mkdir -p "$W"
TOK=${TOK_DIR:-build/tiny-tokenizer}
[ -f "$TOK/tokenizer.json" ] || { TOK=$W/tok; python3 "$PACK/bin/sglang_make_tokenizer.py" "$TOK" 512 || exit 1; }
python3 "$HERE/make_tiny.py" "$TOK" "$W" || exit 1

stamp driver
PYTHONPATH=operator:$SITE python3 "$HERE/agent_vs_sglang.py" --work "$W" --site "$SITE" --out "$O" \
  --budget-s "${BUDGET_S:-420}" --health-generation "${HEALTH_GENERATION:-off}"
rc=$?
stamp "driver rc=$rc"
exit $rc
