#!/bin/bash
# Session 8, call D: the spread of the probe's move rate over rounds (direct_s8c.py), then the
# moves table of gpu_moves.py (default direct transport against packed, same run) at 4096 and 1024.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.:bench/probes
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout 240 python bench/probes/direct_s8c.py --out "$OUT" 2>&1 | grep -v Warning | tail -20
PLANS="static: all=tp4@0-3; mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; pair: low=tp2@0-1, low=tp2@2-3; ones: low=tp1@0, low=tp1@1, low=tp1@2, low=tp1@3"
for t in 4096 1024; do
  timeout 120 python bench/gpu_moves.py --preset llama-3.1-8b --plans "$PLANS" --transports direct-push,packed \
    --copies "" --pieces 1 --repeats 10 --move-tokens $t --out $OUT 2>&1 | grep -E "GB/s"
  mv $OUT/gpu_moves.json $OUT/gpu_moves_$t.json
done
