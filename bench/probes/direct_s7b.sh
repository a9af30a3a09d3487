#!/bin/bash
# Session 7, second 4-GPU call: the direct kernel's settings (bench/probes/direct_tune.py), then the bench
# run whose plan switches move KV between TP degrees mid-run (TP2 high lane <-> all-TP1 burst plan),
# with the grid's longest sequence at 4096 tokens so its switch-cost probe times 4096-token moves.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/nitsum-gpu}
timeout 170 python bench/probes/direct_tune.py --out $OUT 2>&1 | grep -vE "^(W|I)[0-9]{4}" | tail -60
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --max-seq-len 4096 --num-pages 2048 --static-plan static:all=tp4@0-3 --rates 24"
KEEP_PLOTS=0 BENCH_TIMEOUT=200 bash bench/gpu_host_ab.sh "$ARGS" \
  "tp2set_4k|.||--configs adaptive --plans mixed:high=tp2@0-1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
rm -f $OUT/gpus.txt
sed -n '/## Switch costs/,/## Plots/p' $OUT/tp2set_4k/report.md; grep -E "KV move|transport" $OUT/tp2set_4k.log | head
mv $OUT/tp2set_4k.log $OUT/tp2set_4k_log.txt; rm -f $OUT/tp2set_4k/report.md
find $OUT -type f | sort
