#!/bin/bash
# Session 6 on 4 GPUs, one call: the headline (static TP4 against the all-TP1 adaptive set, greedy, 24 req/s)
# again, now ending with the switch-cost probe; the same with 30% sampled requests; and session 3-4's set with
# a TP2 high lane (adaptive only), whose switches move KV between TP degrees mid-run and whose probe times
# TP2 <-> TP1 moves.
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --max-seq-len 1024 --num-pages 2048 --static-plan static:all=tp4@0-3 --rates 24"
TP1SET="mixed:high=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
KEEP_PLOTS=1 BENCH_TIMEOUT=240 bash bench/gpu_host_ab.sh "$ARGS" \
  "tp1set|.||--plans $TP1SET" \
  "tp1set_sampled|.||--plans $TP1SET --sampled-fraction 0.3" \
  "tp2set|.||--configs adaptive --plans mixed:high=tp2@0-1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
cat $OUT/gpus.txt; rm -f $OUT/gpus.txt $OUT/tp1set_sampled/*.png $OUT/tp2set/*.png
for d in tp1set tp1set_sampled tp2set; do sed -n '/## Switch costs/,/## Plots/p' $OUT/$d/report.md; grep -A3 "## Ratios" $OUT/$d/report.md; done
# at most 8 files come back: keep results.json (report.md is rebuilt from it), the headline's plots, one log
cat $OUT/tp1set.log $OUT/tp1set_sampled.log $OUT/tp2set.log > $OUT/logs.txt; rm -f $OUT/*.log $OUT/*/report.md
find $OUT -type f | sort
