#!/bin/bash
# Session 8, call B: KV-move waits (polling or blocking), copy engines, device time.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.:bench/probes
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvidia-smi topo -m | head -6
python bench/probes/direct_s8b.py --out "$OUT" > "$OUT/direct_s8b.log" 2>&1
rc=$?
sed -n '/^SUMMARY/,$p' "$OUT/direct_s8b.log"
[ $rc -eq 0 ] || tail -30 "$OUT/direct_s8b.log"
exit $rc
