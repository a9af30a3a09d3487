#!/usr/bin/env bash
# The headline figure on 4 GPUs, in one device call: static TP4 against the adaptive set of four
# single-GPU lanes on the same seeded workload (llama-3.1-8b shapes, random weights, greedy), at
# RATES req/s; then the adaptive set with a TP2 `high` lane on a 4096-token grid, so the
# switch-cost probe at the end of its run moves 4096-token sequences between TP degrees.
#   bash bench/headline.sh [RATES]   (default 24,28; results under $OUT/tp1set and $OUT/tp2set_4k)
# Variants: SAMPLED=0.3 adds --sampled-fraction 0.3 (30% of requests at temperature 0.8).
set -u
OUT=${OUT:-/tmp/nitsum-gpu}
RATES=${1:-24,28}
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32
      --prefill-len 256 --num-pages 2048 --static-plan static:all=tp4@0-3 ${SAMPLED:+--sampled-fraction $SAMPLED}"
TP1SET="mixed:high=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
TP2SET="mixed:high=tp2@0-1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
KEEP_PLOTS=1 BENCH_TIMEOUT=290 bash bench/gpu_host_ab.sh "$ARGS" \
  "tp1set|.||--max-seq-len 1024 --rates $RATES --plans $TP1SET"
KEEP_PLOTS=0 BENCH_TIMEOUT=150 bash bench/gpu_host_ab.sh "$ARGS" \
  "tp2set_4k|.||--max-seq-len 4096 --rates 24 --configs adaptive --plans $TP2SET"
for d in tp1set tp2set_4k; do  # the switch costs and ratios of each run, printed for the call's log
  sed -n '/## Switch costs/,/## Plots/p' "$OUT/$d/report.md"
  grep -A4 "## Ratios" "$OUT/$d/report.md"
done
rm -f "$OUT/gpus.txt"
