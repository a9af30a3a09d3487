"""Plan-set measurements on the GPU machine: start-up, weight sharing, KV move bandwidth between
TP degrees, plan-switch cost, and two lanes side by side. One call does everything.

    python bench/gpu_plans.py --preset llama-3.1-8b --out $OUT
(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/gpu_plans.py --preset tiny ...)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nitsum_jax.config import preset
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.plans.probe import fill_random, measure_move  # noqa: F401 (fill_random: gpu_step, gpu_moves)
from nitsum_jax.sampling import SamplingBatch


PLANS = ("static: all=tp4@0-3; mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; "
         "pair: low=tp2@0-1, low=tp2@2-3")  # 5 distinct lanes: every direction of KV move on 4 GPUs


def plan_set_arguments() -> argparse.ArgumentParser:
    """The options every plan-set measurement takes (model, plans, pages, sequence length)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--plans", default=PLANS)
    ap.add_argument("--num-pages", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--move-tokens", type=int, default=4096)
    return ap


def report(results: dict, out: str | None, name: str, echo: bool = True) -> None:
    """Print the results (unless `echo` is off) and, with --out, write them to OUT/NAME.json."""
    if echo:
        print(json.dumps(results, indent=2))
    if out:
        with open(f"{out}/{name}.json", "w") as f:
            json.dump(results, f, indent=2)


def time_move_phases(plan_set, src, dst, tokens, repeats):
    """Median ms of each phase of a packed move (gather, transfer, scatter), each synced, and
    the raw device-to-device bandwidth of one transfer of the same total size."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    route = plan_set.routes[(src.spec.devices, dst.spec.devices)]
    seq = ("phases", src.name, dst.name)
    src.allocator.reserve(seq, tokens)
    dst.allocator.reserve(seq, tokens)
    src_pages, dst_pages = src.allocator.pages(seq), dst.allocator.pages(seq)
    phases = {"gather": [], "transfer": [], "scatter": [], "python_total": []}
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        buffers, n = src.gather_packed(src_pages, route.gather)
        jax.block_until_ready(buffers)
        t1 = time.perf_counter()
        shards = [{s.device: s.data for s in b.addressable_shards} for b in buffers]
        pieces = [shards[t][src.devices[k]] for t, k, _ in route.transfers]
        placed = jax.device_put(pieces, [dst.devices[j] for _, _, j in route.transfers])
        jax.block_until_ready(placed)
        t2 = time.perf_counter()
        arrived = {(j, route.sources[j].index((t, k))): a for (t, k, j), a in zip(route.transfers, placed)}
        shape = dst.packed_buffer_shape(route.per_buffer, n)
        incoming = tuple(jax.make_array_from_single_device_arrays(
            shape, NamedSharding(dst.mesh, P(None, None, None, "tp")),
            [arrived[(j, u)] for j in range(len(dst.devices))]) for u in range(route.incoming))
        dst.scatter_packed(dst_pages, incoming, route.scatter, n)
        jax.block_until_ready(dst.kv)
        t3 = time.perf_counter()
        if i >= 2:
            phases["gather"].append(t1 - t0)
            phases["transfer"].append(t2 - t1)
            phases["scatter"].append(t3 - t2)
            phases["python_total"].append(t3 - t0)
    src.allocator.free(seq)
    dst.allocator.free(seq)
    out = {k: statistics.median(v) * 1e3 for k, v in phases.items()}
    out["transfers"] = len(route.transfers)
    out["piece_MB"] = pieces[0].nbytes / 1e6
    # Raw: the same bytes as one array, device 0 -> device 1 (or the lane's devices).
    a = jax.device_put(jnp.ones((sum(p.nbytes for p in pieces) // 2,), jnp.bfloat16), src.devices[0])
    other = next(d for d in jax.devices() if d != src.devices[0])
    raw = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(a, other))
        raw.append(time.perf_counter() - t0)
    out["raw_one_transfer_GBps"] = a.nbytes / statistics.median(raw) / 1e9
    return out


def decode_inputs(lane, batch, seq_len):
    pages = lane.allocator.pages_for(seq_len)
    table = np.tile(np.arange(pages, dtype=np.int32), (batch, 1))
    table = np.pad(table, ((0, 0), (0, lane.pages_per_seq - pages)))
    return (np.ones((batch, 1), np.int32), np.full(batch, seq_len - 1, np.int32), np.ones(batch, np.int32), table,
            SamplingBatch.from_params([None] * batch, [0] * batch, [seq_len] * batch))


def time_rounds(lanes, batch, seq_len, repeats):
    """Median wall time of one step on every lane, dispatched from one thread, then synced."""
    inputs = [decode_inputs(lane, batch, seq_len) for lane in lanes]
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        outs = [lane.dispatch(*x) for lane, x in zip(lanes, inputs)]
        jax.block_until_ready(outs)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_rounds_threaded(lanes, batch, seq_len, repeats):
    """Same round, one Python thread per lane (each dispatches and waits for its own lane)."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = [decode_inputs(lane, batch, seq_len) for lane in lanes]
    times = []
    with ThreadPoolExecutor(len(lanes)) as pool:
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            list(pool.map(lambda li: jax.block_until_ready(li[0].dispatch(*li[1])), zip(lanes, inputs)))
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = plan_set_arguments()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = preset(args.preset)
    plans = parse_plans(args.plans)
    grid = BucketGrid(decode_batch=(args.batch,), prefill_len=(), max_seq_len=args.move_tokens,
                      min_move_pages=args.move_tokens // args.page_size // 2)  # moves in 1 or 2 pieces
    t0 = time.perf_counter()
    ps = PlanSet(cfg, None, plans, num_pages=args.num_pages, page_size=args.page_size, grid=grid)
    startup = time.perf_counter() - t0
    print(f"start-up {startup:.1f}s, {ps.num_programs} programs", flush=True)
    for i, lane in enumerate(ps.lanes.values()):
        fill_random(lane, i)
    memory = ps.memory_report()
    held = ps.weights.bytes_per_device()
    unshared = {}
    for lane in ps.lanes.values():
        for slot in lane.params.chunks:
            for a in jax.tree.leaves(slot):
                for s in a.addressable_shards:
                    unshared[s.device.id] = unshared.get(s.device.id, 0) + s.data.nbytes
    results = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
               "preset": args.preset, "plans": [str(p) for p in plans], "startup_s": startup,
               "programs": ps.num_programs, "weight_overhead": memory["weight_overhead"],
               "weights_per_device_gib": {d: b / 2**30 for d, b in held.items()},
               "weights_per_device_without_sharing_gib": {d: b / 2**30 for d, b in unshared.items()}}
    lanes = {lane.name: lane for lane in ps.lanes.values()}
    moves = {}
    pairs = [("tp4@0-3", "tp2@0-1"), ("tp2@0-1", "tp4@0-3"), ("tp2@0-1", "tp2@2-3"), ("tp1@2", "tp4@0-3"),
             ("tp4@0-3", "tp1@3"), ("tp1@2", "tp2@0-1")]
    for a, b in pairs:
        if a in lanes and b in lanes:
            m = measure_move(ps, lanes[a], lanes[b], args.move_tokens, args.repeats)
            moves[f"{a}->{b}"] = {"ms": m["ms"], "GB": m["MB"] / 1e3, "GB_per_s": m["GB_per_s"],
                                  "contents_equal": m["contents_equal"]}
    results["kv_moves"] = moves
    phases = {}
    for a, b in (("tp2@0-1", "tp4@0-3"), ("tp4@0-3", "tp1@3")):
        if a in lanes and b in lanes:
            phases[f"{a}->{b}"] = time_move_phases(ps, lanes[a], lanes[b], args.move_tokens, args.repeats)
            print(f"move phases {a}->{b}: {phases[f'{a}->{b}']}", flush=True)
    results["kv_move_phases"] = phases
    seq_len = min(1024, args.move_tokens)
    static = ps.lanes_of(plans[0].name)
    mixed = ps.lanes_of(plans[1].name)
    steady_static = time_rounds(static, args.batch, seq_len, args.repeats)
    steady_mixed = time_rounds(mixed, args.batch, seq_len, args.repeats)
    # Switch: after steps on the static plan, the first round on the mixed plan's lanes.
    switch = []
    inputs_static = [decode_inputs(lane, args.batch, seq_len) for lane in static]
    inputs_mixed = [decode_inputs(lane, args.batch, seq_len) for lane in mixed]
    for _ in range(args.repeats):
        jax.block_until_ready([lane.dispatch(*x) for lane, x in zip(static, inputs_static)])
        t0 = time.perf_counter()
        jax.block_until_ready([lane.dispatch(*x) for lane, x in zip(mixed, inputs_mixed)])
        switch.append(time.perf_counter() - t0)
    results["plan_switch"] = {"steady_static_round_ms": steady_static * 1e3,
                              "steady_mixed_round_ms": steady_mixed * 1e3,
                              "first_mixed_round_after_static_ms": statistics.median(switch) * 1e3,
                              "switch_overhead_ms": (statistics.median(switch) - steady_mixed) * 1e3}
    side = {}
    tp1 = [lane for lane in ps.lanes.values() if lane.spec.tp == 1][:2]
    tp2 = [lane for lane in ps.lanes.values() if lane.spec.tp == 2][:2]
    for group in (tp1, tp2):
        if len(group) == 2:
            solo = [time_rounds([lane], args.batch, seq_len, args.repeats) for lane in group]
            both = time_rounds(group, args.batch, seq_len, args.repeats)
            threaded = time_rounds_threaded(group, args.batch, seq_len, args.repeats)
            side[f"{group[0].name}+{group[1].name}"] = {
                "solo_ms": [s * 1e3 for s in solo], "together_one_thread_ms": both * 1e3,
                "rate_vs_solo_one_thread": max(solo) / both, "together_thread_per_lane_ms": threaded * 1e3,
                "rate_vs_solo_thread_per_lane": max(solo) / threaded}
    mixed_threaded = time_rounds_threaded(mixed, args.batch, seq_len, args.repeats)
    side["mixed_plan_round"] = {"one_thread_ms": steady_mixed * 1e3, "thread_per_lane_ms": mixed_threaded * 1e3}
    results["side_by_side"] = side
    report(results, args.out, "gpu_plans")


if __name__ == "__main__":
    main()
