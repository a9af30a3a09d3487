"""KV-move bandwidth between TP degrees: XLA page gather/scatter against the Pallas page-copy
kernels, each sent in 1, 2 or 4 pieces, on one plan set; every move's contents checked.

    PYTHONPATH=. python bench/gpu_moves.py --preset llama-3.1-8b --out $OUT
(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/gpu_moves.py --preset tiny
 --move-tokens 256 --copies xla)
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from nitsum_jax.config import preset
from nitsum_jax.kv import kv_bytes_per_page
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans

from gpu_plans import fill_random, time_move_phases, time_moves  # bench/ is on sys.path as a script

PAIRS = [("tp4@0-3", "tp2@0-1"), ("tp2@0-1", "tp4@0-3"), ("tp2@0-1", "tp2@2-3"), ("tp1@2", "tp4@0-3"),
         ("tp4@0-3", "tp1@3"), ("tp1@2", "tp2@0-1"), ("tp2@0-1", "tp1@3")]


def use_copy(ps: PlanSet, impl: str) -> float:
    """Recompile every lane's packed move programs with page copies `impl`; returns seconds."""
    t0 = time.perf_counter()
    for lane in ps.lanes.values():
        lane.move_copy = impl
        lane._packed_gathers.clear()
        lane._packed_scatters.clear()
    for (a, b), route in ps.routes.items():
        ps.lanes[a].compile_packed_gather(route.groups)
        ps.lanes[b].compile_packed_scatter(route.placement, len(route.sources[0]), route.per_buffer)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--plans", default="static: all=tp4@0-3; mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; "
                                       "pair: low=tp2@0-1, low=tp2@2-3")
    ap.add_argument("--num-pages", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--move-tokens", type=int, default=4096)
    ap.add_argument("--copies", default="kernel,xla")
    ap.add_argument("--pieces", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = preset(args.preset)
    pieces = [int(p) for p in args.pieces.split(",")]
    pages = args.move_tokens // args.page_size
    grid = BucketGrid(decode_batch=(8,), prefill_len=(), max_seq_len=args.move_tokens,
                      min_move_pages=pages // max(pieces))
    t0 = time.perf_counter()
    ps = PlanSet(cfg, None, parse_plans(args.plans), num_pages=args.num_pages, page_size=args.page_size, grid=grid)
    print(f"start-up {time.perf_counter() - t0:.1f}s, {ps.num_programs} programs", flush=True)
    for i, lane in enumerate(ps.lanes.values()):
        fill_random(lane, i)
    lanes = {lane.name: lane for lane in ps.lanes.values()}
    gbytes = kv_bytes_per_page(cfg, 1) * args.move_tokens / 1e9
    results = {"device": str(jax.devices()[0].device_kind), "preset": args.preset, "GB": gbytes, "moves": {},
               "phases": {}}
    for impl in args.copies.split(","):
        print(f"{impl}: programs in {use_copy(ps, impl):.1f}s", flush=True)
        for p in pieces:
            ps.move_pieces = p
            for a, b in PAIRS:
                if a in lanes and b in lanes:
                    t, before, after = time_moves(ps, lanes[a], lanes[b], args.move_tokens, args.repeats)
                    row = {"ms": t * 1e3, "GB_per_s": gbytes / t, "contents_equal": abs(before - after) <= 1e-6 * abs(before)}
                    results["moves"][f"{impl} x{p} {a}->{b}"] = row
                    print(f"{impl} x{p} {a}->{b}: {row['ms']:.2f} ms {row['GB_per_s']:.0f} GB/s "
                          f"equal={row['contents_equal']}", flush=True)
        ps.move_pieces = 1
        for a, b in (("tp2@0-1", "tp4@0-3"), ("tp4@0-3", "tp1@3")):
            if a in lanes and b in lanes:
                results["phases"][f"{impl} {a}->{b}"] = time_move_phases(ps, lanes[a], lanes[b], args.move_tokens,
                                                                         args.repeats)
                print(f"phases {impl} {a}->{b}: {results['phases'][f'{impl} {a}->{b}']}", flush=True)
    if args.out:
        with open(f"{args.out}/gpu_moves.json", "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
