#!/usr/bin/env bash
# Disaggregated vLLM with kvxfer: a prefill server, a decode server, the proxy, one
# request through them, and the same request to the decode server alone (one engine);
# exits non-zero unless both answers are the same text.
#
#   PY=.venv-vllm/bin/python examples/vllm_disagg.sh [MODEL_DIR]
#
# Without MODEL_DIR a tiny random Llama is built (examples/hf_tiny_llama.py), so no model
# hub is needed. CPU build of vLLM: `make test-vllm` sets up .venv-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-vllm/bin/python}
MODEL=${1:-/tmp/kvxfer-tiny-llama}
[ -n "${1:-}" ] || "$PY" examples/hf_tiny_llama.py "$MODEL" >/dev/null
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
LOGS=${LOGS:-$(mktemp -d)}
KV='{"kv_connector":"KvxferConnector","kv_connector_module_path":"kvxfer.integrations.vllm","kv_role":"kv_both","kv_load_failure_policy":"recompute"}'
SERVE=("$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" --dtype float32
       --block-size 32 --max-model-len 2048 --enforce-eager --no-enable-prefix-caching
       --kv-transfer-config "$KV")

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"${SERVE[@]}" --port 8100 >"$LOGS/prefill.log" 2>&1 & pids+=($!)
"${SERVE[@]}" --port 8200 >"$LOGS/decode.log" 2>&1 & pids+=($!)
"$PY" examples/vllm_proxy.py --port 8000 --prefill http://127.0.0.1:8100 \
    --decode http://127.0.0.1:8200 >"$LOGS/proxy.log" 2>&1 & pids+=($!)

for port in 8100 8200 8000; do   # two servers on 2 cores: a few minutes
    for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
    curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "port $port never healthy; logs in $LOGS"; exit 1; }
done

REQ='{"model":"'"$MODEL"'","prompt":"Paged attention keeps the KV cache in fixed-size blocks of tokens, and a connector moves those blocks from one engine to another.","max_tokens":16,"temperature":0}'
split=$(curl -sf http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d "$REQ")
one=$(curl -sf http://127.0.0.1:8200/v1/completions -H 'Content-Type: application/json' -d "$REQ")
text() { "$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["choices"][0]["text"])' "$1"; }
echo "prefill+decode: $(text "$split")"
echo "one engine:     $(text "$one")"
[ "$(text "$split")" = "$(text "$one")" ] || { echo "outputs differ; logs in $LOGS"; exit 1; }
grep -q "released blocks of" "$LOGS/prefill.log" || { echo "no kvxfer handover in the prefill log"; exit 1; }
echo "same tokens; the KV went over kvxfer (logs in $LOGS)"
