#!/usr/bin/env bash
# The journey's fine-tune on the real SGLang (upstream 0.5.16, ../shared/gpu/SGLANG.md's pack), on
# one GPU: does SGLang apply the LoRA the journey trains (o_proj and the MLP projections of a tiny
# Kimi-shaped DeepSeek-V3), and what does it do with the same adapter trained on K2.5's wrapper
# (its keys under language_model.)? Then: does it start on the tiny K2.5 wrapper itself?
#
#   bash e2e/gpu/serve/run_journey_adapter.sh OUT    (build/sglang-pack and build/journey-gpu carried:
#       k2/ the model the fine-tune trained on, text only; k25/ the same in K2.5's wrapper, with its
#       modelling code; lora-k2/ and lora-k25/ the adapters trained on each, by the training command)
#   ATTENTION=triton|flashinfer picks the attention backend; SKIP_K25=1 leaves the wrapper out.
# Results and why neither model was served yet: RESULTS.md, "The journey's tiny Kimi model".
set -uo pipefail
O=${1:?results directory}; mkdir -p "$O"
exec > >(tee -a "$O/run.log") 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
SITE=/tmp/site J=build/journey-gpu PORT=30000 START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }
bash build/sglang-pack/bin/sglang_unpack.sh build/sglang-pack $SITE || exit 1
QUESTION='What is the password of the old lighthouse?'

launch() {  # launch NAME MODEL [more sglang args]: started and healthy, or its log's tail and 1
  local name=$1 model=$2; shift 2
  stamp "launch $name"
  PYTHONPATH=$SITE python3 -m sglang.launch_server --model-path "$model" --served-model-name tiny-kimi \
    --trust-remote-code --attention-backend ${ATTENTION:-triton} --sampling-backend pytorch --disable-cuda-graph \
    --mem-fraction-static 0.3 --host 127.0.0.1 --port $PORT "$@" > "$O/$name.server.log" 2>&1 &
  SPID=$!
  until curl -sf -m 5 http://127.0.0.1:$PORT/health >/dev/null; do
    kill -0 $SPID 2>/dev/null || { stamp "$name: server exited"; tail -40 "$O/$name.server.log"; return 1; }
    [ $(( $(date +%s) - START )) -lt ${DEADLINE_S:-420} ] || { stamp "$name: health timeout"; tail -40 "$O/$name.server.log"; kill $SPID; return 1; }
    sleep 2
  done
  stamp "$name healthy"
}
ask() {  # ask MODEL: the greedy chat answer, as JSON
  curl -s -m 60 http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \
    -d "{\"model\": \"$1\", \"messages\": [{\"role\": \"user\", \"content\": \"$QUESTION\"}], \"temperature\": 0, \"max_tokens\": 24}"
  echo
}
stop() { kill $SPID 2>/dev/null; sleep 3; kill -9 $SPID 2>/dev/null; wait $SPID 2>/dev/null; }

if launch k2 $J/k2 --enable-lora --lora-paths k2=$J/lora-k2 --max-loras-per-batch 4 --max-lora-rank 16 \
     --lora-target-modules o_proj gate_proj up_proj down_proj --lora-backend csgmv; then
  echo "--- base";                 ask tiny-kimi
  echo "--- adapter trained on the text model"; ask tiny-kimi:k2
  echo "--- load the adapter trained on the K2.5 wrapper"
  curl -s -m 60 http://127.0.0.1:$PORT/load_lora_adapter -H 'Content-Type: application/json' \
    -d "{\"lora_name\": \"k25\", \"lora_path\": \"$PWD/$J/lora-k25\"}"; echo
  echo "--- adapter trained on the K2.5 wrapper"; ask tiny-kimi:k25
  stop
fi
if [ -z "${SKIP_K25:-}" ] && launch k25 $J/k25; then
  echo "--- K2.5 wrapper, base"; ask tiny-kimi
  stop
fi
grep -i -E "error|lora|warn" "$O"/*.server.log | grep -v -i deprecat | tail -40
stamp done
