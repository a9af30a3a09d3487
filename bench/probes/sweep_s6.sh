#!/bin/bash
# Session 6 on 4 GPUs, one call: device_put / raw peer copy latency (bench/probes/put_delay.py), then static TP4
# against the all-TP1 adaptive set at 28 and 32 req/s (greedy), where both configurations are past their
# capacity, each ending with the switch-cost probe.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 120 python bench/probes/put_delay.py --mb 134 2>&1 | grep -v Warning > $OUT/put_delay.txt; cat $OUT/put_delay.txt
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --max-seq-len 1024 --num-pages 2048 --static-plan static:all=tp4@0-3 --rates 28,32"
TP1SET="mixed:high=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
KEEP_PLOTS=1 BENCH_TIMEOUT=330 bash bench/gpu_host_ab.sh "$ARGS" "tp1set_sweep|.||--plans $TP1SET"
sed -n '/## Rate sweep/,/## Plots/p' $OUT/tp1set_sweep/report.md; grep -A3 "## Ratios" $OUT/tp1set_sweep/report.md
rm -f $OUT/gpus.txt $OUT/tp1set_sweep/report.md; find $OUT -type f | sort
