#!/usr/bin/env bash
# Engine A/B on the lent GPU machine: the same `nitsum-jax bench` workload run by several
# variants in one call, so the comparison shares the machine. A variant is
# "NAME|TREE|ENV=VALUE ...|EXTRA BENCH ARGS": TREE is "." (this working copy) or a `git archive`
# tarball of an older commit carried in the working copy; the last two fields may be empty (EXTRA
# args follow ARGS, so e.g. a later --plans or --configs wins). Usage on the device:
#   bash bench/gpu_host_ab.sh "BENCH ARGS" "old|old.tar|" "new|.|" "new_nochain|.|NITSUM_CHAIN_STEPS=0"
# Results under $OUT/NAME; per lane: milliseconds per step (in the step) and per loop iteration.
# BENCH_TIMEOUT: seconds per variant (default 280); KEEP_PLOTS=1 keeps the PNG plots; GLOBAL: options
# before `bench` (e.g. "--devices 1").
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nitsum-gpu}
ARGS=$1; shift
if [[ -d .wheels ]]; then
  python -c "import rich, matplotlib, psutil, prometheus_client" 2>/dev/null || \
    pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$OUT/gpus.txt"
python -c "import tokenizers, jax; print('tokenizers', tokenizers.__version__, 'jax', jax.__version__)"
for variant in "$@"; do
  IFS='|' read -r name tree envs extra <<< "$variant"
  if [[ $tree != "." ]]; then mkdir -p "/tmp/$name" && tar -xf "$tree" -C "/tmp/$name"; tree="/tmp/$name"; else tree=$PWD; fi
  echo "=== $name ($(date -u +%H:%M:%S)) $envs ${extra:-}"
  (cd "$tree" && env $envs PYTHONPATH="$tree" timeout "${BENCH_TIMEOUT:-280}" python -m nitsum_jax.cli ${GLOBAL:-} bench $ARGS ${extra:-} --no-progress \
     --out "$OUT/$name" > "$OUT/$name.log" 2>&1); echo "--- exit $?"
  rm -f "$OUT/$name/requests.jsonl"  # keep what comes back small (the device tool returns few files)
  [[ ${KEEP_PLOTS:-0} == 1 ]] || rm -f "$OUT/$name/"*.png
  sed -n '/## Per class/,/## Plan switches/p' "$OUT/$name/report.md" 2>/dev/null | grep -E "^\| (static|adaptive)|^- adaptive"
  python - "$OUT/$name/results.json" <<'PY' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
for n, c in d["configs"].items():
    print(n, {k: f"{c['lane_busy_s'][k] / max(1, c['steps'][k]) * 1e3:.2f} ms/step in, "
                 f"{c['span_s'] / max(1, c['steps'][k]) * 1e3:.2f} ms/iteration, {c['steps'][k]} steps"
              for k in c["steps"] if c["steps"][k]})
PY
done
