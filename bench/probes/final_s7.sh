#!/bin/bash
# Session 7, last 4-GPU call: the direct transport with its tuned defaults on every kind of move (4096 and 1024
# tokens, against the packed transport in the same run), page layout adjacent vs shuffled, then the headline
# pair with 30% sampled requests.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/nitsum-gpu}
PLANS="static: all=tp4@0-3; mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; pair: low=tp2@0-1, low=tp2@2-3; ones: low=tp1@0, low=tp1@1, low=tp1@2, low=tp1@3"
timeout 150 python bench/gpu_moves.py --preset llama-3.1-8b --plans "$PLANS" --transports direct-push,direct-split,packed \
  --copies "" --pieces 1 --repeats 10 --move-tokens 4096 --out $OUT 2>&1 | grep -E "GB/s|start-up"
mv $OUT/gpu_moves.json $OUT/gpu_moves_4096.json
timeout 100 python bench/gpu_moves.py --preset llama-3.1-8b --plans "$PLANS" --transports direct-push,packed \
  --copies "" --pieces 1 --repeats 10 --move-tokens 1024 --out $OUT 2>&1 | grep -E "GB/s"
mv $OUT/gpu_moves.json $OUT/gpu_moves_1024.json
timeout 100 python bench/probes/direct_scatter.py 2>&1 | grep -E "GB/s" | tee $OUT/direct_scatter.txt
ARGS="--preset llama-3.1-8b --duration 20 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --max-seq-len 1024 --num-pages 2048 --static-plan static:all=tp4@0-3 --rates 24"
TP1SET="mixed:high=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3;burst:high+low=tp1@0,low=tp1@1,low=tp1@2,low=tp1@3"
KEEP_PLOTS=0 BENCH_TIMEOUT=230 bash bench/gpu_host_ab.sh "$ARGS" "tp1set_sampled|.||--plans $TP1SET --sampled-fraction 0.3"
sed -n '/## Switch costs/,/## Plots/p' $OUT/tp1set_sampled/report.md; grep -A3 "## Ratios" $OUT/tp1set_sampled/report.md
mv $OUT/tp1set_sampled.log $OUT/tp1set_sampled_log.txt; rm -f $OUT/gpus.txt $OUT/*/report.md
find $OUT -type f | sort
