#!/bin/bash
# Session 8, call A (4x H100): the direct kernel against copy-engine moves, the lowest-first
# allocator's adjacent pages against spread ones, where a move's time goes, kernel settings.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvidia-smi topo -m | head -6
python bench/probes/direct_s8.py --out "$OUT" > "$OUT/direct_s8.log" 2>&1
rc=$?
sed -n '/^SUMMARY/,$p' "$OUT/direct_s8.log"
[ $rc -eq 0 ] || tail -30 "$OUT/direct_s8.log"
exit $rc
