#!/bin/bash
# Session 8, last 4-GPU call: the direct transport's GPU check (every lane pair, bit-identical
# contents, now through the copy engines for adjacent pages), then the headline (static TP4 against
# the all-TP1 adaptive set, greedy, 24 and 28 req/s) and the TP2-high set with a 4096-token grid, so
# the switch-cost probe of the same runs times 4096-token moves between TP degrees.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nitsum-gpu}
PYTHONPATH=.:tests timeout 150 python bench/gpu_direct_check.py > $OUT/direct_check.txt 2>&1; echo "direct check exit $?"
grep -E "PASS|FAIL|checks" $OUT/direct_check.txt | tail -4
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --num-pages 2048 --static-plan static:all=tp4@0-3"
TP1SET="mixed:high=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
KEEP_PLOTS=1 BENCH_TIMEOUT=290 bash bench/gpu_host_ab.sh "$ARGS" \
  "tp1set|.||--max-seq-len 1024 --rates 24,28 --plans $TP1SET"
KEEP_PLOTS=0 BENCH_TIMEOUT=150 bash bench/gpu_host_ab.sh "$ARGS" \
  "tp2set_4k|.||--max-seq-len 4096 --rates 24 --configs adaptive --plans mixed:high=tp2@0-1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
rm -f $OUT/gpus.txt
for d in tp1set tp2set_4k; do sed -n '/## Switch costs/,/## Plots/p' $OUT/$d/report.md; grep -A4 "## Ratios" $OUT/$d/report.md; done
cat $OUT/tp1set.log $OUT/tp2set_4k.log > $OUT/logs.txt; rm -f $OUT/*.log $OUT/*/report.md
find $OUT -type f | sort
