#!/bin/bash
# Session 8, call E: time stamps inside a 1024-token move (direct_s8e.py).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.:bench/probes
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout 200 python bench/probes/direct_s8e.py --out "$OUT" 2>&1 | grep -v Warning | tail -20
