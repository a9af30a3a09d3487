#!/bin/bash
# Run P of session 5: needs commit 5c625aa with bench/probes/cond_probe.diff applied (the shipped
# code no longer has the conditional). Static TP2 bench, one run per sampling variant.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
python -c "import rich, matplotlib, psutil, prometheus_client" 2>/dev/null || pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | tail -1
PLAN=${PLAN:-static:all=tp2@0-1}
for mode in ${MODES:-cond greedy where}; do
NITSUM_SAMPLING_COND=$mode timeout 200 python -m nitsum_jax.cli bench --preset llama-3.1-8b --duration 16 --prompt-len 64-512 --output-len 64-256 --decode-batch 8,32 --prefill-len 256 --max-seq-len 1024 --num-pages 2048 --configs static --static-plan "$PLAN" --rates ${RATE:-8} --out $OUT/$mode --no-progress > $OUT/$mode.log 2>&1
MODE=$mode python - <<'PY'
import json, os
r = json.load(open(os.environ["OUT"] + "/" + os.environ["MODE"] + "/results.json"))
c = r["configs"]["static"]
h = c["classes"]["high"]
print(os.environ["MODE"], "done", c["completed"], "failed", c["failed"], "tput", round(c["throughput_rps"], 2), "gpu util", [round(x) for x in c.get("gpu_utilization_pct", [])],
      "TPOT p50/p99 ms", round(h["tpot_p50_s"]*1e3, 2), round(h["tpot_p99_s"]*1e3, 2),
      {k: round(1e3 * c["lane_busy_s"][k] / max(v, 1), 2) for k, v in c["steps"].items()}, "ms/step")
PY
rm -f $OUT/$mode/requests.jsonl $OUT/$mode/*.png
done
