#!/bin/bash
# Session 8 (4x H200 lent for nvidia-h100-x4): run one probe of bench/probes and print its summary.
#   bash bench/probes/s8_probe.sh direct_s8    # call A: kernel against copy engines, adjacent against
#                                              # spread pages, where a move's time goes, kernel settings
#   bash bench/probes/s8_probe.sh direct_s8b   # call B: polled against blocking waits, device time
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.:bench/probes
probe=$1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
nvidia-smi topo -m | head -6
python "bench/probes/$probe.py" --out "$OUT" > "$OUT/$probe.log" 2>&1
rc=$?
sed -n '/^SUMMARY/,$p' "$OUT/$probe.log"
[ $rc -eq 0 ] || tail -30 "$OUT/$probe.log"
exit $rc
