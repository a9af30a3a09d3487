#!/usr/bin/env bash
# The same `nitsum-jax bench` on two checkouts, one after the other on the same machine: this
# tree and BASE (another checkout's root, e.g. `git archive <commit> nitsum_jax setup.py
# pyproject.toml protos | tar -x -C out/base`), for a change that must keep the engine's speed.
# Usage: bash bench/ab_bench.sh BASE OUT [bench arguments...]; results in OUT/{base,head}/.
# BENCHMARKS.md, "Engine host path", cites it.
set -euo pipefail
base=$1 out=$(realpath -m "$2")
shift 2
mkdir -p "$out"
gen() {  # the gRPC code a checkout's package imports, generated where it lies
  python -c "import sys, pathlib; sys.path.insert(0, '$1/nitsum_jax/server/_proto'); import codegen; codegen.generate(pathlib.Path('$1').resolve())"
}
for side in base head; do
  root=$([[ $side == base ]] && echo "$base" || echo ".")
  gen "$root" >/dev/null 2>&1 || echo "note: gRPC code not generated in $root (grpcio-tools missing); bench runs in process"
  echo "=== $side ($root) $(date -u +%H:%M:%S)"
  (cd "$root" && PYTHONPATH=. python -m nitsum_jax.cli "$@" --out "$out/$side" --no-progress)
  rm -f "$out/$side/requests.jsonl"
done
