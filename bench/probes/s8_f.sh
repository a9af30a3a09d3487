#!/bin/bash
# Session 8, call F: after trimming the host's share of a move (reused launch parameters and copy
# descriptor, tuples for the plan, one-run fast paths in the allocator): the probe's statistic over
# 8 rounds with the default transport, and the time stamps inside a 1024-token move.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.:bench/probes
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout 200 python bench/probes/direct_s8c.py --movers default --out "$OUT" 2>&1 | grep -v Warning | tail -10
timeout 150 python bench/probes/direct_s8e.py --hows alternate --out "$OUT" 2>&1 | grep -v Warning | tail -6
