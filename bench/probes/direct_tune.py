"""The direct KV-move kernel's settings on 4 GPUs: mode (push / pull / split), pages per block (loads
in flight per thread) and threads per block, each timed as whole moves (measure_move: 4096 tokens of
the 8B shape, median of 10, contents checked) on the pairs nearest the 300 GB/s line; then where a
TP1 -> TP1 move's time goes: the launches and stream waits alone (`run`, launches planned before)
against the whole `PlanSet.move`.

    PYTHONPATH=. python bench/probes/direct_tune.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from nitsum_jax.config import preset
from nitsum_jax.kernels import peer_pages
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.plans.probe import fill_random, measure_move

PLANS = ("static: all=tp4@0-3; mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; pair: low=tp2@0-1, low=tp2@2-3; "
         "ones: low=tp1@0, low=tp1@1, low=tp1@2, low=tp1@3")
PAIRS = [("tp1@0", "tp1@1"), ("tp1@2", "tp2@0-1"), ("tp2@0-1", "tp1@3"), ("tp2@0-1", "tp2@2-3"),
         ("tp4@0-3", "tp1@3"), ("tp1@2", "tp4@0-3")]
SETTINGS = [("push", 4, 256), ("pull", 4, 256), ("split", 4, 256), ("push", 8, 256), ("push", 2, 512),
            ("push", 4, 128), ("split", 8, 256), ("pull", 8, 128)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = preset("llama-3.1-8b")
    ps = PlanSet(cfg, None, parse_plans(PLANS), num_pages=1024, page_size=16, move_transport="direct",
                 grid=BucketGrid(decode_batch=(8,), prefill_len=(), max_seq_len=args.tokens,
                                 min_move_pages=args.tokens // 16))
    for i, lane in enumerate(ps.lanes.values()):
        fill_random(lane, i)
    lanes = {lane.name: lane for lane in ps.lanes.values()}
    out = {"device": jax.devices()[0].device_kind, "tokens": args.tokens, "moves": {}, "breakdown": {}}
    best: dict[str, float] = {}
    for mode, ppb, threads in SETTINGS:
        ps.peer_mover = peer_pages.PeerPageMover(ps.devices, mode, ppb, threads)
        key = f"{mode} ppb{ppb} t{threads}"
        rates = []
        for a, b in PAIRS:
            m = measure_move(ps, lanes[a], lanes[b], args.tokens, args.repeats)
            out["moves"][f"{key} {a}->{b}"] = {k: m[k] for k in ("ms", "GB_per_s", "contents_equal")}
            rates.append(m["GB_per_s"])
            print(f"{key} {a}->{b}: {m['ms']:.3f} ms {m['GB_per_s']:.0f} GB/s equal={m['contents_equal']}", flush=True)
        best[key] = min(rates)
        print(f"{key}: slowest pair {min(rates):.0f} GB/s, median {statistics.median(rates):.0f}", flush=True)
    out["slowest_pair_GB_per_s"] = best
    # Where a TP1 -> TP1 move's time goes, with the default settings.
    ps.peer_mover = mover = peer_pages.PeerPageMover(ps.devices, "push")
    src, dst = lanes["tp1@0"], lanes["tp1@1"]
    src.allocator.reserve("b", args.tokens)
    dst.allocator.reserve("b", args.tokens)
    plan = peer_pages.copy_plan(src.layout.assign, dst.layout.assign)
    launches = peer_pages.plan_launches(plan, mover.addresses(src), mover.addresses(dst), [d.id for d in src.devices],
                                        [d.id for d in dst.devices], "push",
                                        src.kv.k[0].sharding.shard_shape(src.kv_shape), dst.kv_shape[2], 2,
                                        src.allocator.pages("b"), dst.allocator.pages("b"))
    jax.block_until_ready((src.kv, dst.kv))
    runs, syncs = [], []
    for _ in range(20):
        t0 = time.perf_counter()
        mover.run(launches, dst)
        runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mover.cu.synchronize(mover.streams[src.devices[0].id])
        syncs.append(time.perf_counter() - t0)
    nbytes = sum(x.nbytes for x in launches)
    out["breakdown"] = {"run_ms": statistics.median(runs) * 1e3, "run_GB_per_s": nbytes / statistics.median(runs) / 1e9,
                        "empty_sync_ms": statistics.median(syncs) * 1e3, "MB": nbytes / 1e6}
    print("breakdown tp1@0->tp1@1:", json.dumps(out["breakdown"]), flush=True)
    if args.out:
        with open(f"{args.out}/direct_tune.json", "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
