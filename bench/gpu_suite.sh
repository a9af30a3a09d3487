#!/usr/bin/env bash
# Everything measured on the lent GPU machine, in one call (device time is scarce):
#   kernel check + timings, decode step vs memory floor (MBU), plan-set figures (weights,
#   KV moves, switch, lanes side by side). Usage on the device: bash bench/gpu_suite.sh [parts]
# parts: any of kernel,step,moves,plans,bench,fp8 (default kernel,step,plans); fp8: the fp8 step against
# bf16 on one GPU and on lanes of 2 and 4 where the machine has them; BENCH_ARGS: the bench's
# arguments. Output under $OUT. XLA option variants of a step: XLA_FLAGS=... python bench/gpu_step.py.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=.
OUT=${OUT:-/tmp/nitsum-gpu}
mkdir -p "$OUT"
PARTS=${1:-kernel,step,plans}
if [[ -d .wheels ]]; then  # pure or cp312 wheels carried from the dev machine (no network here)
  python -c "import rich, matplotlib, psutil, prometheus_client" 2>/dev/null || \
    pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | tail -2
fi
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpus.txt"
NGPU=$(wc -l < "$OUT/gpus.txt")
python -c "import jax; print('jax', jax.__version__, jax.devices())"
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "--- $name exit $? ($(date -u +%H:%M:%S))"
  grep -v -E "^\s*$|Warning|warn\(" "$OUT/$name.log" | tail -n 45
}
[[ $PARTS == *kernel* ]] && run kernel 170 python bench/gpu_kernel.py --quick --out "$OUT"
[[ $PARTS == *step* ]] && run step 220 python bench/gpu_step.py --preset llama-3.1-8b --impls kernel,reference,xla_default --reference-batches 32 --out "$OUT"
[[ $PARTS == *moves* ]] && run moves 200 python bench/gpu_moves.py --preset llama-3.1-8b --pieces 1,2 --profile "tp4@0-3->tp1@3" --out "$OUT"
[[ $PARTS == *plans* ]] && run plans 130 python bench/gpu_plans.py --preset llama-3.1-8b --out "$OUT"
if [[ $PARTS == *fp8* ]]; then
  run fp8 300 python bench/gpu_fp8.py --agree-prompts 4 --agree-tokens 64 --out "$OUT"
  for tp in 2 4; do
    (( NGPU >= tp )) && run "fp8-tp$tp" 300 python bench/gpu_fp8.py --tp "$tp" --agree-prompts 1 --agree-tokens 8 \
      --tag="-tp$tp" --out "$OUT"
  done
fi
[[ $PARTS == *bench* ]] && run bench 330 python -m nitsum_jax.cli bench ${BENCH_ARGS:-} --out "$OUT/bench"
rm -f "$OUT/gpus.txt" "$OUT/bench/requests.jsonl"  # the device returns only a few files a call
exit 0
