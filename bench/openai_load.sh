#!/usr/bin/env bash
# Drive an OpenAI-compatible server with GuideLLM (a load generator this project did not write):
# one GuideLLM process per tier, at the same time, each sending streamed /v1/completions with its
# tier in the x-nitsum-priority header, then one table of each tier's TTFT and TPOT.
#
#   pip install guidellm            # not a project dependency: the bench tool of the server's users
#   bench/openai_load.sh            # starts `nitsum-jax serve --preset tiny --http-port 18080` (4 host devices)
#   bench/openai_load.sh http://host:8000   # an already running server (nitsum-jax, vLLM, ...)
#
# Environment (defaults in brackets): RATE_HIGH [2] and RATE_LOW [6] requests/s, REQUESTS [60] per
# tier, PROMPT_TOKENS [64], OUTPUT_TOKENS [32], OUT [openai-load-out] for GuideLLM's JSON,
# TOKENIZER: a Hugging Face tokenizer name or folder GuideLLM sizes prompts with (default for the
# tiny preset: its byte-level tokenizer, written to $OUT/tokenizer), PLANS for the started server
# ["mixed: high=tp2@0-1, low=tp2@2-3"]. Another server ignores x-nitsum-priority: both processes
# then measure one queue.
set -euo pipefail

RATE_HIGH=${RATE_HIGH:-2} RATE_LOW=${RATE_LOW:-6} REQUESTS=${REQUESTS:-60}
PROMPT_TOKENS=${PROMPT_TOKENS:-64} OUTPUT_TOKENS=${OUTPUT_TOKENS:-32} OUT=${OUT:-openai-load-out}
PLANS=${PLANS:-"mixed: high=tp2@0-1, low=tp2@2-3"}
command -v guidellm >/dev/null || { echo "openai_load.sh: guidellm not found: pip install guidellm" >&2; exit 2; }
mkdir -p "$OUT"

URL=${1:-}
if [ -z "$URL" ]; then
  PORT=18080 URL=http://127.0.0.1:18080
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m nitsum_jax.cli --devices 4 serve --preset tiny \
    --no-grpc --host 127.0.0.1 --http-port $PORT --plans "$PLANS" --max-seq-len 256 --prefill-len 64 \
    --decode-batch 1,4,8 --num-pages 128 > "$OUT/server.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 300); do  # the engine compiles every lane first: /health is 503 until then
    [ "$(curl -s -o /dev/null -w '%{http_code}' $URL/health)" = 200 ] && break
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
    sleep 2
  done
fi
MODEL=$(curl -sf "$URL/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
if [ -z "${TOKENIZER:-}" ]; then
  TOKENIZER="$OUT/tokenizer"
  python - "$TOKENIZER" <<'EOF'
import sys
from transformers import PreTrainedTokenizerFast
from nitsum_jax.tokenizer import TextTokenizer
PreTrainedTokenizerFast(tokenizer_object=TextTokenizer.byte_level().tokenizer, bos_token="<|begin_of_text|>",
                        eos_token="<|end_of_text|>").save_pretrained(sys.argv[1])
EOF
fi

run_tier() {  # tier rate
  local backend
  backend=$(printf '{"kind": "openai_http", "target": "%s", "model": "%s", "request_format": "/v1/completions", "extras": {"headers": {"x-nitsum-priority": "%s"}}}' "$URL" "$MODEL" "$1")
  HF_HUB_OFFLINE=1 guidellm run --backend "$backend" --tokenizer "kind=hf_auto,model=$TOKENIZER" \
    --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
    --profile "kind=poisson,rate=$2" --constraint "kind=max_requests,count=$REQUESTS" \
    --output "kind=json,path=$OUT/guidellm-$1.json" --disable-console > "$OUT/guidellm-$1.log" 2>&1
}
run_tier high "$RATE_HIGH" & HIGH=$!
run_tier low "$RATE_LOW" & LOW=$!
wait $HIGH && wait $LOW

python - "$OUT" "$MODEL" <<'EOF'
import json, sys
out, model = sys.argv[1], sys.argv[2]
print(f"GuideLLM against {model}, streamed /v1/completions, one process per tier at once")
print("| tier | rate req/s | completed | errored | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |")
print("|---|---|---|---|---|---|---|")
for tier in ("high", "low"):
    bench = json.load(open(f"{out}/guidellm-{tier}.json"))["benchmarks"][0]
    m = bench["metrics"]
    ttft, tpot = m["time_to_first_token_ms"]["successful"], m["time_per_output_token_ms"]["successful"]
    print(f"| {tier} | {bench['config']['strategy'].get('rate', '?')} | {m['request_totals']['successful']} | "
          f"{m['request_totals']['errored']} | {m['output_tokens_per_second']['successful']['mean']:.0f} | "
          f"{ttft['median']:.1f} / {ttft['percentiles']['p99']:.1f} | "
          f"{tpot['median']:.1f} / {tpot['percentiles']['p99']:.1f} |")
EOF
