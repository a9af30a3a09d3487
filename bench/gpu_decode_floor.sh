#!/usr/bin/env bash
# TP1 decode against the memory floor on one GPU (BENCHMARKS.md, "Decode roofline"). Parts, chosen
# by PARTS (default: all, in this order; a device call holds 10 minutes, so two calls can split them):
#   kernel  gpu_kernel.py --quick: the Pallas kernels checked on the card (paged attention, the fused
#           decode kernel, KV-move page copies) and timed (fused decode at B=1 and B=64, context 2048);
#   c1024   gpu_step.py at context 1024, batches 1-256: the fused decode path (`kernel`), the earlier
#           RoPE + KV write + paged kernel path (`paged`) and the TP1 lane of a four-chunk plan set
#           (`--chunks 4`: one run of four chunks per weight, as `layout.weight_runs` lays it out), all
#           in one process against one 8 GiB copy; kernel profiles of a b1 and a b8 step;
#   c4096   the same at context 4096, batches 1-128 (256 x 4096 tokens do not fit), 1 GiB copy;
#   sweep   the fused kernel's block sizes and splits at short contexts in long tables and at 4096.
# Usage on the device: OUT=... PARTS="c1024 c4096" bash bench/gpu_decode_floor.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/nitsum-gpu}
PARTS=${PARTS:-kernel c1024 c4096 sweep}
mkdir -p "$OUT"
if [[ -d .wheels ]]; then
  python -c "import rich, psutil, prometheus_client" 2>/dev/null || \
    pip install -q --no-index --no-deps .wheels/*.whl 2>&1 | grep -v -i warn | tail -2
fi
nvidia-smi --query-gpu=index,name,clocks.max.sm --format=csv,noheader | tee "$OUT/gpus.txt"
COMMON="--preset llama-3.1-8b --tps 1 --impls kernel,paged --out $OUT"
for part in $PARTS; do
  echo "=== $part ($(date -u +%H:%M:%S))"
  case $part in
    kernel) timeout "${CHECK_TIMEOUT:-200}" python bench/gpu_kernel.py --quick --out "$OUT" 2>&1 | grep -v -i warn | \
              tee "$OUT/$part.log" | \
              sed -n '/== checks/,$p' ;;
    c1024) timeout "${FLOOR_TIMEOUT:-330}" python bench/gpu_step.py $COMMON --chunks 4 --context 1024 \
             --batches 1,8,32,64,128,256 --profile 1:1,1:8 --tag _c1024 2>&1 | grep -v -i warn | tee "$OUT/$part.log" | cut -c1-220 ;;
    c4096) timeout "${LONG_TIMEOUT:-240}" python bench/gpu_step.py $COMMON --context 4096 --max-seq-len 4096 \
             --batches 1,8,32,64,128 --profile 1:8 --copy-gib 1 --tag _c4096 2>&1 | grep -v -i warn | tee "$OUT/$part.log" | cut -c1-220 ;;
    sweep) timeout "${SWEEP_TIMEOUT:-300}" python bench/gpu_kernel.py --out "$OUT" \
             --fused-sweep "${SWEEP_SHAPES:-1:1024:4096,64:1024:4096,8:4096}" 2>&1 | grep -v -i warn | \
             tee "$OUT/$part.log" | grep "^fused\|FAILED" | cut -c1-200 ;;
    *) echo "unknown part $part" ;;
  esac
  echo "--- $part exit ${PIPESTATUS[0]}"  # the part's whole output: $OUT/$part.log
done
echo "=== done ($(date -u +%H:%M:%S))"
