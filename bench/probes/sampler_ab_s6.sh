#!/bin/bash
# Session 6 on 4 GPUs: the headline workload with 30% sampled requests, static TP4 and the all-TP1 set,
# before (old_sampler.tar: the argsort sampler, carried uncommitted) and after the uint32-key sampler.
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --max-seq-len 1024 --num-pages 2048 --static-plan static:all=tp4@0-3 --rates 24 --sampled-fraction 0.3 --no-switch-probe"
TP1SET="mixed:high=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
BENCH_TIMEOUT=200 bash bench/gpu_host_ab.sh "$ARGS" "old|old_sampler.tar||--plans $TP1SET" "new|.||--plans $TP1SET"
cat $OUT/old.log $OUT/new.log > $OUT/logs.txt; rm -f $OUT/*.log $OUT/*/report.md $OUT/gpus.txt; find $OUT -type f | sort
