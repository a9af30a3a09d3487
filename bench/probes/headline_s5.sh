#!/bin/bash
# Session 5 headline on 4 GPUs: static TP4 against an all-TP1 adaptive set (tp1set, both rates, plots)
# and against session 3-4's set with a TP2 high lane (tp2set, adaptive only, rate 24), one call.
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --max-seq-len 1024 --num-pages 2048 --static-plan static:all=tp4@0-3 --rates 24,28"
KEEP_PLOTS=1 BENCH_TIMEOUT=290 bash bench/gpu_host_ab.sh "$ARGS" \
  "tp1set|.||--plans mixed:high=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3" \
  "tp2set|.||--configs adaptive --rates 24 --plans mixed:high=tp2@0-1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
cat $OUT/gpus.txt; rm -f $OUT/gpus.txt $OUT/tp2set/report.md $OUT/tp2set/*.png
