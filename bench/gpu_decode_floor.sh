#!/usr/bin/env bash
# TP1 decode against the memory floor on one GPU, in one call (BENCHMARKS.md, "Decode roofline"):
#   1. the one-chunk lane at batches 1-256 (context 1024), kernel profiles of a b1 and a b8 step,
#      and the TP1 lane of a four-chunk plan set built on the same GPU (`--chunks 1,4`);
#   2. the same lane under XLA's command-buffer settings: off, and with the layer loop captured
#      (`+WHILE,+CONDITIONAL`), at batches 1, 8 and 32.
# Usage on the device: OUT=... bash bench/gpu_decode_floor.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/nitsum-gpu}
if [[ -d .wheels ]]; then
  python -c "import rich, psutil, prometheus_client" 2>/dev/null || \
    pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$OUT/gpus.txt"
COMMON="--preset llama-3.1-8b --tps 1 --impls kernel --context 1024 --out $OUT"
echo "=== floor ($(date -u +%H:%M:%S))"
timeout "${FLOOR_TIMEOUT:-300}" python bench/gpu_step.py $COMMON --batches 1,8,32,64,128,256 \
  --profile 1:1,1:8 --chunks 1,4 --tag _c1024 2>&1 | grep -v -i warn; echo "--- exit $?"
for variant in off while; do
  case $variant in
    off) flags="--xla_gpu_enable_command_buffer=" ;;
    while) flags="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1" ;;
  esac
  echo "=== command buffers: $variant ($(date -u +%H:%M:%S))"
  XLA_FLAGS="$flags" timeout "${VARIANT_TIMEOUT:-120}" python bench/gpu_step.py $COMMON --batches 1,8,32 \
    --profile 1:8 --copy-gib 1 --tag "_c1024_cmdbuf_$variant" 2>&1 | grep -v -i warn | grep -E "b +[0-9]+:|MBU denom|error|Error"
  echo "--- exit $?"
done
echo "=== done ($(date -u +%H:%M:%S))"
