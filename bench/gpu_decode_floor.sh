#!/usr/bin/env bash
# TP1 decode against the memory floor on one GPU, in one call (BENCHMARKS.md, "Decode roofline"):
#   0. the Pallas kernels checked on the card (gpu_kernel.py --quick: attention, also over several
#      chunk positions, and the KV-move page copies with per-piece positions);
#   1. the one-chunk lane at batches 1-256 (context 1024), kernel profiles of a b1 and a b8 step;
#   2. the TP1 lane of a four-chunk plan set built on the same GPU (`--chunks 4`: one run of four
#      chunks per weight, as `layout.weight_runs` lays it out), in its own process;
#   3. the one-chunk lane at context 4096, batches 1-128 (256 x 4096 tokens do not fit).
# Steps 2 and 3 measure their MBU denominator on a 1 GiB copy (step 1 on 8 GiB).
# Usage on the device: OUT=... bash bench/gpu_decode_floor.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/nitsum-gpu}
if [[ -d .wheels ]]; then
  python -c "import rich, psutil, prometheus_client" 2>/dev/null || \
    pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$OUT/gpus.txt"
COMMON="--preset llama-3.1-8b --tps 1 --out $OUT"
echo "=== kernel checks ($(date -u +%H:%M:%S))"
timeout "${CHECK_TIMEOUT:-240}" python bench/gpu_kernel.py --quick --out "$OUT" 2>&1 | grep -v -i warn | \
  sed -n '/== checks/,$p'; echo "--- exit $?"
echo "=== floor, context 1024 ($(date -u +%H:%M:%S))"
timeout "${FLOOR_TIMEOUT:-300}" python bench/gpu_step.py $COMMON --impls kernel --context 1024 \
  --batches 1,8,32,64,128,256 --profile 1:1,1:8 --tag _c1024 2>&1 | grep -v -i warn; echo "--- exit $?"
echo "=== four-chunk lane, context 1024 ($(date -u +%H:%M:%S))"
timeout "${CHUNKS_TIMEOUT:-240}" python bench/gpu_step.py $COMMON --impls none --chunks 4 --context 1024 \
  --batches 1,8,32,64,128,256 --profile 1:8 --copy-gib 1 --tag _c1024_four-chunk 2>&1 | grep -v -i warn
echo "--- exit $?"
echo "=== floor, context 4096 ($(date -u +%H:%M:%S))"
timeout "${LONG_TIMEOUT:-240}" python bench/gpu_step.py $COMMON --impls kernel --context 4096 --max-seq-len 4096 \
  --batches 1,8,32,64,128 --profile 1:8 --copy-gib 1 --tag _c4096 2>&1 | grep -v -i warn; echo "--- exit $?"
echo "=== done ($(date -u +%H:%M:%S))"
