#!/usr/bin/env bash
# TP>1 decode steps with XLA command buffers (CUDA graphs) that also capture the collectives:
# one gpu_step run per XLA_FLAGS setting, in one call. Usage on the device:
#   bash bench/gpu_cmdbuf_tp.sh TPS BATCHES   (e.g. 2 8,32; results under $OUT/cmdbuf_tp*.json)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/nitsum-gpu}
TPS=${1:-2}; BATCHES=${2:-8,32}
i=0
for flags in "" \
             "--xla_gpu_enable_command_buffer=+COLLECTIVES" \
             "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL,+COLLECTIVES --xla_gpu_graph_min_graph_size=1"; do
  echo "=== XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" timeout 170 python bench/gpu_step.py --tps "$TPS" --batches "$BATCHES" --impls kernel \
    --profile "${TPS%%,*}:${BATCHES##*,}" --repeats 20 --tag "_cmdbuf_tp$i" --out "$OUT" 2>&1 \
    | grep -v -i warn | grep -E "tp[0-9] b|all kernels|all_reduce|nccl|error|Error" | head -12
  i=$((i + 1))
done
