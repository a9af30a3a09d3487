#!/bin/bash
# Session 7, 4 GPUs (the first 4x H100 the service lent since session 2): the headline (static TP4 against the
# all-TP1 adaptive set, greedy, 24 req/s) and the TP2-high set whose switches move KV mid-run, grid up to
# 4096 tokens so its probe times 4096-token moves, both with the direct KV-move transport (tuned defaults).
set -u
OUT=${OUT:-/tmp/nitsum-gpu}
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --num-pages 2048 --static-plan static:all=tp4@0-3 --rates ${RATES:-24}"
TP1SET="mixed:high=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
KEEP_PLOTS=1 BENCH_TIMEOUT=230 bash bench/gpu_host_ab.sh "$ARGS" \
  "tp1set|.||--max-seq-len 1024 --plans $TP1SET ${EXTRA:-}" \
  "tp2set_4k|.||--max-seq-len 4096 --configs adaptive --plans mixed:high=tp2@0-1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
cat $OUT/gpus.txt; rm -f $OUT/gpus.txt $OUT/tp2set_4k/*.png
for d in tp1set tp2set_4k; do sed -n '/## Switch costs/,/## Plots/p' $OUT/$d/report.md; grep -A3 "## Ratios" $OUT/$d/report.md; done
cat $OUT/tp1set.log $OUT/tp2set_4k.log > $OUT/logs.txt; rm -f $OUT/*.log $OUT/*/report.md
find $OUT -type f | sort
