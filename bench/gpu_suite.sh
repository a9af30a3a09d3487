#!/usr/bin/env bash
# Everything measured on the lent GPU machine, in one call (30 device-minutes a session):
#   kernel check + timings, decode step vs memory floor (MBU), plan-set figures (weights,
#   KV moves, switch, lanes side by side). Usage on the device: bash bench/gpu_suite.sh [parts]
# parts: any of kernel,step,moves,cmdbuf,plans,bench (default kernel,step,plans). Output under $OUT.
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
if [[ $PARTS == *cmdbuf* ]]; then  # CUDA graphs over the layer loop (command buffers), TP1 and TP4
  i=0
  for flags in "" "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1"; do
    XLA_FLAGS="$flags" run "cmdbuf$i" 150 python bench/gpu_step.py --tps 1,4 --batches 8,32 --impls kernel \
      --profile 9:9 --repeats 10 --tag "_cmdbuf$i" --out "$OUT"
    i=$((i+1))
  done
fi
[[ $PARTS == *plans* ]] && run plans 130 python bench/gpu_plans.py --preset llama-3.1-8b --out "$OUT"
if [[ ,$PARTS, == *,flags,* ]]; then  # which XLA flags remove the per-step copies (tp1, batch 32, with profile)
  i=0
  for flags in "--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*greedy_step.*" \
               "--xla_disable_hlo_passes=dot-merger" "--xla_gpu_enable_dynamic_slice_fusion=true" \
               "--xla_disable_hlo_passes=dot-merger --xla_gpu_enable_dynamic_slice_fusion=true"; do
    XLA_FLAGS="$flags" run "flags$i" 150 python bench/gpu_step.py --tps 1 --batches 32 --impls kernel --profile 1:32 \
      --repeats 10 --tag "_flags$i" --out "$OUT"
    i=$((i+1))
  done
fi
if [[ $PARTS == *moreflags* ]]; then
  i=4
  for flags in "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true" \
               "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true --xla_disable_hlo_passes=fusion-dynamic-memcpy-rewriter" \
               "--xla_gpu_enable_dynamic_slice_fusion=true --xla_disable_hlo_passes=fusion-dynamic-memcpy-rewriter" \
               "--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*greedy_step.*"; do
    XLA_FLAGS="$flags" run "flags$i" 150 python bench/gpu_step.py --tps 1 --batches 32 --impls kernel --profile 1:32 \
      --repeats 10 --tag "_flags$i" --out "$OUT"
    i=$((i+1))
  done
  f=$(ls $OUT/hlo/*greedy_step*after_optimizations.txt | head -1)
  echo "HLO: $f"; grep -c . "$f"
  grep -n -E "memcpy|dynamic-slice|copy\(" "$f" | grep -v -E "s32\[\]|u32\[" | cut -c1-260 | head -40
  rm -rf $OUT/hlo
fi
[[ $PARTS == *bench* ]] && run bench 330 python -m nitsum_jax.cli bench ${BENCH_ARGS:-} --out "$OUT/bench"
rm -f "$OUT/gpus.txt" "$OUT/bench/requests.jsonl"  # the device returns only a few files a call
exit 0
