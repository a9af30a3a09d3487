"""Session 8's KV-move probe on 4 GPUs: the direct kernel against the copy engines (one pitched
copy per array pair and run of adjacent pages, on 1, 4 or 8 streams a GPU), whole moves
(measure_move, median of 10, contents checked) at the bench's 1024 tokens and at 4096, with a
sequence's pages adjacent (the lowest-first allocator on free lanes) and spread (a random half of
each lane's pages held); then where a TP1 -> TP1 move's time goes (host waits, planning, the copy
alone), and four kernel settings at 1024 tokens.

    PYTHONPATH=. python bench/probes/direct_s8.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import jax

from nitsum_jax.config import preset
from nitsum_jax.kernels import peer_pages
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.plans.probe import fill_random, measure_move

PLANS = ("static: all=tp4@0-3; mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; pair: low=tp2@0-1, low=tp2@2-3; "
         "ones: low=tp1@0, low=tp1@1, low=tp1@2, low=tp1@3")
PAIRS = [("tp1@0", "tp1@1"), ("tp2@0-1", "tp1@3"), ("tp1@2", "tp2@0-1"), ("tp4@0-3", "tp1@3"),
         ("tp1@2", "tp4@0-3"), ("tp2@0-1", "tp2@2-3"), ("tp2@0-1", "tp1@0")]
CONFIGS = {"kernel": dict(engine_runs=0), "engine x1": dict(engine_runs=8, engine_streams=1),
           "engine x4": dict(engine_runs=8, engine_streams=4), "engine x8": dict(engine_runs=8, engine_streams=8)}


def med_us(f, n=50):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def make_plan_set(preset_name: str = "llama-3.1-8b", num_pages: int = 2048):
    """PLANS' lanes (direct transport, 4096-token grid) with random pages; (plan set, lanes by name)."""
    ps = PlanSet(preset(preset_name), None, parse_plans(PLANS), num_pages=num_pages, page_size=16,
                 move_transport="direct",
                 grid=BucketGrid(decode_batch=(8,), prefill_len=(), max_seq_len=4096, min_move_pages=256))
    for i, lane in enumerate(ps.lanes.values()):
        fill_random(lane, i)
    return ps, {lane.name: lane for lane in ps.lanes.values()}


def finish(out: dict, rows: list[str], out_dir: str | None, name: str) -> None:
    """Write `out` to OUT_DIR/NAME.json and print the summary rows last (the device tool returns
    the end of the output)."""
    if out_dir:
        with open(f"{out_dir}/{name}.json", "w") as f:
            json.dump(out, f, indent=2)
    print("\n".join(["", "SUMMARY"] + rows))


def plan_work(mover, src, dst, src_pages, dst_pages, engines: int = 0) -> list:
    """The launches (engines=0) or the copy-engine copies on `engines` streams a GPU that `mover`
    would issue for moving src_pages of `src` into dst_pages of `dst`."""
    shape, isz = src.kv.k[0].sharding.shard_shape(src.kv_shape), src.kv.k[0].dtype.itemsize
    pairs = mover._pairs(src, dst, mover.addresses(src), mover.addresses(dst))
    if not engines:
        return peer_pages.launches_for(pairs, shape, dst.kv_shape[2], isz, src_pages, dst_pages)
    return peer_pages.plan_copies(pairs, shape, dst.kv_shape[2], isz, peer_pages.page_runs(src_pages, dst_pages),
                                  engines)


def spread(lanes, on: bool):
    for lane in lanes.values():
        a = lane.allocator
        if on:
            keep = set(random.Random(lane.name).sample(range(a.num_pages), a.num_pages // 2))
            for p in range(a.num_pages):
                a.reserve(("filler", p), lane.page_size)
            for p in range(a.num_pages):
                if p not in keep:
                    a.free(("filler", p))
        else:
            for seq in [s for s in a.sequences if s[0] == "filler"]:
                a.free(seq)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--num-pages", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ps, lanes = make_plan_set(args.preset, args.num_pages)
    out = {"device": jax.devices()[0].device_kind, "moves": {}, "breakdown": {}, "settings": {}}
    rows = []

    def record(key, m):
        out["moves"][key] = {k: m[k] for k in ("ms", "GB_per_s", "contents_equal")}
        rows.append(f"{key}: {m['ms']:.3f} ms {m['GB_per_s']:.0f} GB/s equal={m['contents_equal']}")
        print(rows[-1], flush=True)

    movers = {name: peer_pages.PeerPageMover(ps.devices, "push", **kw) for name, kw in CONFIGS.items()}
    for layout in ("adjacent", "spread"):
        spread(lanes, layout == "spread")
        for name, mover in movers.items():
            if layout == "spread" and name != "kernel" and name != "engine x4":
                continue
            ps.peer_mover = mover
            for tokens in (1024, 4096):
                for a, b in PAIRS:
                    record(f"{layout} {name} {tokens} {a}->{b}", measure_move(ps, lanes[a], lanes[b], tokens, args.repeats))
    spread(lanes, False)
    # Where a TP1 -> TP1 move's time goes.
    src, dst = lanes["tp1@0"], lanes["tp1@1"]
    for name in ("kernel", "engine x4"):
        mover = ps.peer_mover = movers[name]
        for tokens in (1024, 4096):
            src.allocator.reserve("b", tokens)
            dst.allocator.reserve("b", tokens)
            sp, dp = src.allocator.pages("b"), dst.allocator.pages("b")
            work = plan_work(mover, src, dst, sp, dp, 0 if name == "kernel" else 4)
            shape, isz = src.kv.k[0].sharding.shard_shape(src.kv_shape), src.kv.k[0].dtype.itemsize
            pairs = mover._pairs(src, dst, mover.addresses(src), mover.addresses(dst))
            nbytes = sum(w.nbytes for w in work)
            jax.block_until_ready((src.kv, dst.kv))
            b = {"MB": nbytes / 1e6,
                 "ready_us": med_us(lambda: jax.block_until_ready((src.kv, dst.kv))),
                 "addresses_pairs_us": med_us(lambda: mover._pairs(src, dst, mover.addresses(src), mover.addresses(dst))),
                 "plan_us": med_us(lambda: peer_pages.launches_for(pairs, shape, dst.kv_shape[2], isz, sp, dp)),
                 "runs_copies_us": med_us(lambda: peer_pages.plan_copies(
                     pairs, shape, dst.kv_shape[2], isz, peer_pages.page_runs(sp, dp), 4)),
                 "alloc_us": med_us(lambda: (dst.allocator.free("b"), dst.allocator.reserve("b", tokens))),
                 "run_us": med_us(lambda: mover.run(work, dst), 20),
                 "mover_move_us": med_us(lambda: mover.move(src, dst, sp, dp), 20)}
            b["run_GB_per_s"] = nbytes / b["run_us"] / 1e3
            dst.allocator.free("b")
            src.allocator.free("b")
            b["measure_move"] = measure_move(ps, src, dst, tokens, args.repeats)
            out["breakdown"][f"{name} {tokens}"] = b
            rows.append(f"breakdown {name} {tokens}: " + json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                                                  for k, v in b.items() if k != "measure_move"})
                        + f" whole {b['measure_move']['GB_per_s']:.0f} GB/s")
            print(rows[-1], flush=True)
    # Kernel settings at 1024 tokens.
    for ppb, threads in ((4, 128), (8, 128), (2, 128), (4, 256), (8, 256)):
        ps.peer_mover = peer_pages.PeerPageMover(ps.devices, "push", ppb, threads, engine_runs=0)
        for a, b in PAIRS[:4]:
            m = measure_move(ps, lanes[a], lanes[b], 1024, args.repeats)
            out["settings"][f"ppb{ppb} t{threads} {a}->{b}"] = m["GB_per_s"]
            rows.append(f"settings ppb{ppb} t{threads} 1024 {a}->{b}: {m['GB_per_s']:.0f} GB/s equal={m['contents_equal']}")
            print(rows[-1], flush=True)
    finish(out, rows, args.out, "direct_s8")


if __name__ == "__main__":
    main()
