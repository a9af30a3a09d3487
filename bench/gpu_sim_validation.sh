#!/usr/bin/env bash
# The simulator's validation inputs from one call on the lent GPU machine: `nitsum-jax profile` of
# the lane shapes the devices allow, then the real engine's `nitsum-jax bench` on a seeded
# workload over the same bucket grid. `nitsum-jax simulate --profile $OUT/profile.json` with the
# same workload options (docs/simulation.md, "Validation") gives the figures to compare.
# Usage on the device: bash bench/gpu_sim_validation.sh DEVICES "PROFILE ARGS" "BENCH ARGS"
# PROFILE_TIMEOUT / BENCH_TIMEOUT: seconds for each (default 200 / 240).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nitsum-gpu}
DEVICES=$1 PROFILE_ARGS=$2 BENCH_ARGS=$3
if [[ -d .wheels ]]; then
  python -c "import rich, psutil, prometheus_client" 2>/dev/null || \
    pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$OUT/gpus.txt"
echo "=== profile ($(date -u +%H:%M:%S))"
timeout "${PROFILE_TIMEOUT:-200}" python -m nitsum_jax.cli --devices "$DEVICES" profile $PROFILE_ARGS \
  --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1; echo "--- exit $?"; tail -5 "$OUT/profile.log"
echo "=== bench ($(date -u +%H:%M:%S))"
timeout "${BENCH_TIMEOUT:-240}" python -m nitsum_jax.cli --devices "$DEVICES" bench $BENCH_ARGS --no-progress \
  --out "$OUT/bench" > "$OUT/bench.log" 2>&1; echo "--- exit $?"
rm -f "$OUT/bench/requests.jsonl" "$OUT/bench/"*.png  # what comes back stays small
sed -n '/## Per class/,/## Plan switches/p' "$OUT/bench/report.md" 2>/dev/null | grep -E "^\| static"
echo "=== done ($(date -u +%H:%M:%S))"
