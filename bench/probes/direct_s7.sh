#!/bin/bash
# Session 7 on 4 GPUs, one call: the direct KV-move transport (one CUDA kernel pass, GPU to GPU)
# checked for real (tiny-model walks keep tokens and NLL; 8B 4096-token round trips bit-identical),
# then timed against the packed transport (gather, device_put, scatter) on every kind of move.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.:tests
OUT=${OUT:-/tmp/nitsum-gpu}
nvidia-smi --query-gpu=index,name --format=csv,noheader
python -c "from nitsum_jax.kernels import cuda; print('nvrtc', cuda.nvrtc())"
timeout 240 python bench/gpu_direct_check.py 2>&1 | grep -E "^(PASS|FAIL|\[|[0-9]+ failed)|Error" | tee $OUT/direct_check.txt
PLANS="static: all=tp4@0-3; mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; pair: low=tp2@0-1, low=tp2@2-3; ones: low=tp1@0, low=tp1@1, low=tp1@2, low=tp1@3"
timeout 240 python bench/gpu_moves.py --preset llama-3.1-8b --plans "$PLANS" --transports direct-push,direct-pull,packed \
  --copies "" --pieces 1 --repeats 10 --move-tokens 4096 --out $OUT 2>&1 | grep -vE "^(W|I)[0-9]{4}" | tail -45
timeout 100 python bench/gpu_moves.py --preset llama-3.1-8b --plans "$PLANS" --transports direct-push,packed \
  --copies "" --pieces 1 --repeats 10 --move-tokens 1024 --out /tmp 2>&1 | grep -E "GB/s"
