#!/bin/bash
# Run Q of session 5: where does a serving step's time go? gpu_step solo times, a bench run with a
# jax.profiler window (NITSUM_BENCH_PROFILE), then bench/trace_summary.py. Run from the repository root.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
python -c "import rich, matplotlib, psutil, prometheus_client" 2>/dev/null || pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | tail -1

PLAN=${PLAN:-static:all=tp2@0-1}
RATE=${RATE:-8}
[ -n "$NOSTEP" ] || timeout 150 python bench/gpu_step.py --preset llama-3.1-8b --tps ${TPS:-2} --batches 8,32 --impls kernel --repeats 15 --context 512 --max-seq-len 1024 --profile 9:9 --out $OUT > $OUT/step.log 2>&1
grep -E 'tp[0-9] b' $OUT/step.log
rm -rf /tmp/prof
NITSUM_BENCH_PROFILE=/tmp/prof:8:2 timeout 240 python -m nitsum_jax.cli bench --preset llama-3.1-8b --duration 16 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --max-seq-len 1024 --num-pages 2048 --configs static --static-plan "$PLAN" --rates $RATE --out $OUT/bench --no-progress > $OUT/bench.log 2>&1
tail -5 $OUT/bench.log
python - <<'PY'
import json, os
r = json.load(open(os.environ["OUT"] + "/bench/results.json"))
c = r["configs"]["static"]
print("steps", c["steps"], "busy_s", c["lane_busy_s"], "chained", c.get("chained_steps"), "gpu util", c.get("gpu_utilization_pct"))
for k, v in c["steps"].items():
    print(k, "ms/step", round(1e3 * c["lane_busy_s"][k] / max(v, 1), 2))
PY
python bench/trace_summary.py /tmp/prof --out $OUT/trace.json
rm -f $OUT/bench/requests.jsonl $OUT/bench/*.png
