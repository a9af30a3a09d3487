"""KV-move bandwidth between TP degrees: XLA page gather/scatter against the Pallas page-copy
kernels, each sent in 1, 2 or 4 pieces, on one plan set; every move's contents checked.

    PYTHONPATH=. python bench/gpu_moves.py --preset llama-3.1-8b --out $OUT
(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/gpu_moves.py --preset tiny
 --move-tokens 256 --copies xla)
"""

from __future__ import annotations

import glob
import json
import statistics
import tempfile
import time

import jax

from nitsum_jax.config import preset
from nitsum_jax.kv import kv_bytes_per_page
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans

from gpu_plans import fill_random, measure_move, plan_set_arguments, report, time_move_phases  # bench/ is on sys.path as a script

PAIRS = [("tp4@0-3", "tp2@0-1"), ("tp2@0-1", "tp4@0-3"), ("tp2@0-1", "tp2@2-3"), ("tp1@2", "tp4@0-3"),
         ("tp4@0-3", "tp1@3"), ("tp1@2", "tp2@0-1"), ("tp2@0-1", "tp1@3"),
         ("tp2@0-1", "tp1@1"), ("tp1@0", "tp2@0-1"), ("tp1@0", "tp1@1")]  # the last three: on 2 GPUs


def use_copy(ps: PlanSet, impl: str) -> float:
    """Recompile every lane's packed move programs with page copies `impl`; returns seconds."""
    t0 = time.perf_counter()
    for lane in ps.lanes.values():
        lane.move_copy = impl
        lane._packed_gathers.clear()
        lane._packed_scatters.clear()
    for (a, b), route in ps.routes.items():
        ps.lanes[a].compile_packed_gather(route.gather)
        ps.lanes[b].compile_packed_scatter(route.scatter)
    return time.perf_counter() - t0


def profile_moves(ps: PlanSet, src, dst, tokens: int, moves: int = 6) -> dict:
    """Device-side view of `moves` moves src -> dst (jax.profiler): GPU time per kernel or copy
    name (summed over GPUs, per move) and the device span of one move (first start to last end)."""
    seq = ("profile", src.name, dst.name)
    src.allocator.reserve(seq, tokens)
    ps.move(seq, src, dst)
    ps.move(seq, dst, src)
    jax.block_until_ready((src.kv, dst.kv))
    out_dir = tempfile.mkdtemp()
    with jax.profiler.trace(out_dir):
        for _ in range(moves):
            ps.move(seq, src, dst)
            jax.block_until_ready(dst.kv)
            time.sleep(0.003)
            ps.move(seq, dst, src)
            jax.block_until_ready(src.kv)
            time.sleep(0.003)
    src.allocator.free(seq)
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True)[0])
    per_name: dict[str, float] = {}
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:"):
            continue
        for line in plane.lines:
            if "xla" in line.name.lower() or "stream" not in line.name.lower():
                continue
            for ev in line.events:
                key = f"gpu{plane.name.rsplit(':', 1)[-1]} {ev.name[:60]}"
                per_name[key] = per_name.get(key, 0.0) + ev.duration_ns / 1e6 / (2 * moves)
                events.append((ev.start_ns, ev.start_ns + ev.duration_ns, key))
    events.sort()
    spans, start, end, timeline = [], None, None, []
    for a, b, key in events:  # a move's events, separated from the next move's by the 3 ms sleeps
        if start is None or a > end + 1e6:
            if start is not None:
                spans.append((end - start) / 1e6)
            start, end = a, b
        end = max(end, b)
        if len(spans) == 4:  # one move in the middle, event by event (us from its first event)
            timeline.append(f"{(a - start) / 1e3:8.1f} {(b - a) / 1e3:8.1f}  {key}")
    if start is not None:
        spans.append((end - start) / 1e6)
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:20]
    return {"device_span_ms_median": statistics.median(spans) if spans else None, "spans": len(spans),
            "per_move_ms": {k: round(v, 4) for k, v in top}, "timeline_us": timeline}


def time_pairs(ps: PlanSet, lanes: dict, name: str, args, results: dict) -> None:
    """measure_move for every pair of PAIRS the plan set has; rows "NAME SRC->DST" in results["moves"]."""
    for a, b in PAIRS:
        if a in lanes and b in lanes:
            m = measure_move(ps, lanes[a], lanes[b], args.move_tokens, args.repeats)
            row = results["moves"][f"{name} {a}->{b}"] = {k: m[k] for k in ("ms", "GB_per_s", "contents_equal")}
            print(f"{name} {a}->{b}: {row['ms']:.2f} ms {row['GB_per_s']:.0f} GB/s equal={row['contents_equal']}",
                  flush=True)


def main():
    ap = plan_set_arguments()
    ap.add_argument("--transports", default="",
                    help="e.g. direct-push,direct-pull,packed: time every pair with each transport first "
                         "(packed: the Pallas page copies, one piece)")
    ap.add_argument("--copies", default="kernel,xla", help="packed-path variants after that ('' for none)")
    ap.add_argument("--pieces", default="1,2,4")
    ap.add_argument("--sync", default="auto,0,1", help="host sync before sending: 1, 0 or auto (the default rule)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profile", default="tp4@0-3->tp1@3,tp2@0-1->tp2@2-3,tp2@0-1->tp4@0-3,tp2@0-1->tp1@1,tp1@0->tp1@1")
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
    for transport in filter(None, args.transports.split(",")):
        name, _, mode = transport.partition("-")
        ps.use_transport(name)
        if mode:
            ps.peer_mover.mode = mode
        time_pairs(ps, lanes, transport, args, results)
    ps.use_transport("packed")  # the variants below are the packed path's
    for impl in filter(None, args.copies.split(",")):
        print(f"{impl}: programs in {use_copy(ps, impl):.1f}s", flush=True)
        for p, sync in [(p, False) for p in pieces[1:]] + [(1, True), (max(pieces), True)]:
            ps.move_pieces, ps.move_sync = p, sync  # devices' view of a move in pieces
            for pair in filter(None, args.profile.split(",")):
                a, b = pair.split("->")
                if a in lanes and b in lanes:
                    key = f"profile {impl} x{p}{' sync' if sync else ''} {pair}"
                    prof = results["phases"][key] = profile_moves(ps, lanes[a], lanes[b], args.move_tokens)
                    print(f"{key}: {json.dumps(prof, indent=1)}", flush=True)
        ps.move_pieces, ps.move_sync = 1, None
        for sync in ({"1": True, "0": False, "auto": None}[v] for v in args.sync.split(",")):
            ps.move_sync = sync
            for p in pieces:
                ps.move_pieces = p
                time_pairs(ps, lanes, f"{impl} x{p}{({True: ' sync', False: '', None: ' auto'})[sync]}", args, results)
        ps.move_sync = None
        ps.move_pieces = 1
        for a, b in (("tp2@0-1", "tp4@0-3"), ("tp4@0-3", "tp1@3"), ("tp2@0-1", "tp1@1")):
            if a in lanes and b in lanes:
                results["phases"][f"{impl} {a}->{b}"] = time_move_phases(ps, lanes[a], lanes[b], args.move_tokens,
                                                                         args.repeats)
                print(f"phases {impl} {a}->{b}: {results['phases'][f'{impl} {a}->{b}']}", flush=True)
        for pair in filter(None, args.profile.split(",")):
            a, b = pair.split("->")
            if a in lanes and b in lanes:
                try:
                    prof = results["phases"][f"profile {impl} {pair}"] = profile_moves(ps, lanes[a], lanes[b],
                                                                                     args.move_tokens)
                    print(f"profile {impl} {pair}: {json.dumps(prof, indent=1)}", flush=True)
                except Exception as e:  # the timings above stand without it
                    print(f"profile {impl} {pair} failed: {type(e).__name__}: {e}", flush=True)
    report(results, args.out, "gpu_moves", echo=False)  # its lines were printed as it went


if __name__ == "__main__":
    main()
