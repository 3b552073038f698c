#!/usr/bin/env bash
# On the GPU machine, from the repo root: the operator's OpenAI-compatible router in front of the real
# SGLang engine (0.5.16, the pack shared/gpu/sglang_build_pack.sh leaves in build/sglang-pack), with
# the official openai client. Unpacks SGLang into /tmp/site, installs the router's and the client's
# missing wheels (build/router-wheels) into /tmp/router-site, builds a tiny Llama and its adapters
# with the image's own torch/transformers/peft, then runs router_vs_sglang.py, which starts the
# router and the engine and writes OUT_DIR/results.json, the engine's and the router's logs.
#   bash e2e/gpu/serve/run_router.sh OUT_DIR
# build/ is git-ignored: send build/sglang-pack and build/router-wheels along (the device tool's
# carry). build/router-wheels is made on any machine with pip:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d build/router-wheels openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
#     anyio==4.16.0 h11==0.16.0 idna==3.20 prometheus_client==0.26.0
# (openai's other needs, jiter, sniffio, pydantic and typing-extensions, come with the SGLang pack;
# aiohttp and pyyaml with the image.)
# Env: PACK (default build/sglang-pack), WHEELS (default build/router-wheels), ROUTER_SRC (default
#      operator: the directory holding the kimi_operator package the router runs from, e.g. a
#      `git archive` of a commit), TOK_DIR (default
#      build/tiny-tokenizer, else made here), BUDGET_S (default 420: no new section of the driver
#      starts after it), N_SEQ (default 100), CONCURRENCY (default 16), PER_WORKER (default 20),
#      DRIVER_ARGS (more arguments for router_vs_sglang.py, e.g. --freeze-gc-after 3),
#      MODE (default router; abort-leak: lora_abort_leak.py instead, the engine alone: does an
#      abandoned request keep its adapter from being unloaded).
set -uo pipefail
O=${1:?output directory}; mkdir -p "$O"
exec > >(tee -a "$O/run.log") 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HERE=$(cd "$(dirname "$0")" && pwd) ROOT=$(pwd)
PACK=${PACK:-build/sglang-pack} WHEELS=${WHEELS:-build/router-wheels}
ROUTER_SRC=$(cd "${ROUTER_SRC:-operator}" && pwd)
SITE=/tmp/site RSITE=/tmp/router-site W=/tmp/router-vs-sglang START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }

stamp unpack
bash "$PACK/bin/sglang_unpack.sh" "$PACK" "$SITE" || exit 1
stamp router wheels
rm -rf "$RSITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$RSITE" "$WHEELS"/*.whl || exit 1
ROUTER_PATH=$ROUTER_SRC:$RSITE:$SITE     # the router's: its package, then its wheels, then pydantic from the pack
DRIVER_PATH=$RSITE:$SITE   # the driver's: openai 3.x ahead of the pack's openai 2.6.1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -V; echo "CUDA_HOME=$CUDA_HOME"
  echo "image (no PYTHONPATH):"
  python3 - <<'EOF'
import importlib.metadata as md
for name in ("aiohttp", "pyyaml", "prometheus-client", "pydantic", "anyio", "idna", "h11", "httpx", "openai", "truststore", "multidict", "yarl"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
EOF
  echo "router source: $ROUTER_SRC $(cat "$ROUTER_SRC/../COMMIT" 2>/dev/null || git rev-parse HEAD 2>/dev/null)"
  echo "router's PYTHONPATH=$ROUTER_PATH:"
  PYTHONPATH=$ROUTER_PATH python3 -c '
import importlib.metadata as md, aiohttp, prometheus_client, pydantic, yaml, kimi_operator.router.main
for m, d in ((aiohttp, "aiohttp"), (prometheus_client, "prometheus-client"), (pydantic, "pydantic"), (yaml, "pyyaml")):
    print("  ", d, md.version(d), m.__file__)'
  echo "driver's PYTHONPATH=$DRIVER_PATH:"
  PYTHONPATH=$DRIVER_PATH python3 -c '
import importlib.metadata as md, openai, httpx2, jiter, anyio, pydantic
for m, d in ((openai, "openai"), (httpx2, "httpx2"), (jiter, "jiter"), (anyio, "anyio"), (pydantic, "pydantic")):
    print("  ", d, md.version(d), m.__file__)'
} > "$O/env.txt" 2>&1; cat "$O/env.txt"

stamp tiny model
rm -rf "$W"; mkdir -p "$W"
TOK=${TOK_DIR:-build/tiny-tokenizer}
[ -f "$TOK/tokenizer.json" ] || { TOK=$W/tok; python3 "$PACK/bin/sglang_make_tokenizer.py" "$TOK" 512 || exit 1; }
python3 "$HERE/make_tiny.py" "$TOK" "$W" || exit 1

stamp "driver (${MODE:-router})"
if [ "${MODE:-router}" = abort-leak ]; then
  PYTHONPATH=$DRIVER_PATH python3 "$HERE/lora_abort_leak.py" --work "$W" --site "$SITE" --out "$O"
else
  PYTHONPATH=$DRIVER_PATH python3 "$HERE/router_vs_sglang.py" --work "$W" --site "$SITE" --out "$O" \
    --router-pythonpath "$ROUTER_PATH" --budget-s "${BUDGET_S:-420}" --n-seq "${N_SEQ:-100}" \
    --concurrency "${CONCURRENCY:-16}" --per-worker "${PER_WORKER:-20}" ${DRIVER_ARGS:-}
fi
rc=$?
stamp "driver rc=$rc"
exit $rc
