#!/usr/bin/env bash
# Every GPU check of the block-packing kernel (issue 5) in one call, for a lent GPU:
#
#   bash benchmarks/gpu_check.sh            # from the repo root; no pip install needed
#
# 1. environment (GPU, torch, cupy)                         -> $OUT/env.txt
# 2. ptxas resource report + SASS: are the w16 loads 128-bit -> $OUT/ptxas.txt
# 3. all packing tests, GPU tests required to run, not skip -> $OUT/tests.log
# 4. compute-sanitizer memcheck over a few GPU tests          -> $OUT/sanitizer.log
# 5. the benchmark table (32 and 80 layers, 64..4096 blocks) -> $OUT/bench.txt
#
# Output goes to $OUT when set (the device tool brings it back), else to
# /tmp/kvxfer-gpu-check. Exits non-zero if any step fails; the table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/kvxfer-gpu-check}"
PY="${PYTHON:-python3}"  # the GPU image's python3 holds torch and cupy
mkdir -p "$out"
failed=()
step() { echo; echo "=== $1"; }

step "environment"
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, cupy; g = torch.cuda.is_available(); print("torch", torch.__version__,
    "cuda", torch.version.cuda, "cupy", cupy.__version__, "gpu", g and torch.cuda.get_device_name())' \
    2>&1 || true
  nvcc --version | tail -1
} 2>&1 | tee "$out/env.txt"
"$PY" -c 'import sys, torch; from kvxfer.packing import cuda; sys.exit(0 if cuda.available() else 1)' \
  || { echo "no usable CUDA device or cupy: nothing to check"; exit 2; }

step "ptxas / SASS"
{
  nvcc -arch=sm_90 -cubin -o /tmp/kv_pack.cubin -Xptxas -v kvxfer/csrc/kv_pack.cu 2>&1 \
    | grep -E "entry|registers|spill|stack"
  if command -v cuobjdump >/dev/null; then
    for k in kv_pack_w16 kv_unpack_w16; do
      echo "$k: $(cuobjdump -sass -fun "$k" /tmp/kv_pack.cubin | grep -cE 'LDG[.A-Z0-9]*\.128') \
128-bit loads, $(cuobjdump -sass -fun "$k" /tmp/kv_pack.cubin | grep -cE 'STG[.A-Z0-9]*\.128') 128-bit stores"
    done
  fi
} 2>&1 | tee "$out/ptxas.txt" || failed+=(ptxas)

step "tests (GPU tests must run, not skip)"
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_packing.py tests/test_csrc_build.py \
  2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(tests)
if grep -q "SKIPPED.*needs a CUDA GPU" "$out/tests.log"; then
  echo "GPU tests were skipped on a GPU machine"; failed+=(gpu-skipped)
fi

step "compute-sanitizer memcheck (a few GPU tests)"
if command -v compute-sanitizer >/dev/null; then
  timeout 420 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -q -x -p no:cacheprovider -o timeout=400 tests/test_packing.py \
    -k "gpu and 37 and (float16 or bfloat16) and (vllm_nhd or vllm_hnd_kv1 or split_kv) \
        or misaligned" 2>&1 \
    | tail -40 | tee "$out/sanitizer.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(sanitizer)
else
  echo "compute-sanitizer not found: skipped" | tee "$out/sanitizer.log"
fi

step "benchmark"
"$PY" benchmarks/bench_packing.py 2>&1 | tee "$out/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(bench)

echo
if [ "${#failed[@]}" -eq 0 ]; then echo "gpu_check: all steps passed"; exit 0; fi
echo "gpu_check: FAILED steps: ${failed[*]}"
exit 1
