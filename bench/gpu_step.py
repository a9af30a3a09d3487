"""Decode step time against the memory-bandwidth floor (MBU), per TP degree and batch, for the
reference attention and the Pallas kernel, plus a kernel-level profile of one step.

    PYTHONPATH=. python bench/gpu_step.py --preset llama-3.1-8b --out $OUT

Floor of one step on one device = (weight bytes the step reads on that device + KV bytes of
the context it attends to) / the card's memory bandwidth, measured in the same run as the best
device-to-device copy of an 8 GiB buffer (copy_bandwidth.py: driver copy, jitted copy, jitted
multiply). `mbu` is against that copy, `mbu_spec` against the spec sheet where the card is known.
The embedding table is not counted (a step reads B rows of it); the LM head is.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from nitsum_jax.config import preset
from nitsum_jax.kv import kv_bytes_per_page
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.sampling import SamplingBatch
from nitsum_jax.settings import settings

import copy_bandwidth  # bench/ is on sys.path when run as a script
from gpu_plans import fill_random
from trace_summary import merge


def decode_inputs(lane, batch, context, rng):
    """Each row its own random pages (no two rows share a page), position context - 1."""
    pages = -(-context // lane.page_size)
    ids = rng.permutation(lane.kv_shape[2])[:batch * pages].reshape(batch, pages).astype(np.int32)
    table = np.pad(ids, ((0, 0), (0, lane.pages_per_seq - pages)))
    tokens = rng.integers(0, lane.cfg.vocab_size, (batch, 1)).astype(np.int32)
    return (tokens, np.full(batch, context - 1, np.int32), np.ones(batch, np.int32), table,
            SamplingBatch.from_params([None] * batch, [0] * batch, [context] * batch))


def time_step(lane, inputs, repeats):
    for _ in range(3):
        jax.block_until_ready(lane.dispatch(*inputs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(lane.dispatch(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (max(times) - min(times))


def time_pipelined(lane, inputs, repeats) -> float:
    """Seconds a step when `repeats` steps are enqueued back to back and waited for once: the host
    launches step N+1 while step N runs, as the engine's chained decode does, so the time is the
    device's and not the host's launch path."""
    jax.block_until_ready(lane.dispatch(*inputs))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = lane.dispatch(*inputs)
    jax.block_until_ready((out, lane.kv))
    return (time.perf_counter() - t0) / repeats


def weight_bytes_read(lane) -> int:
    """Bytes of weights one device of the lane reads per step (all but the embedding table)."""
    dev = lane.devices[0]
    total = 0
    for slot in lane.params.chunks:
        for name, a in ((n, getattr(slot, n)) for n in slot.__dataclass_fields__):
            if a is None or name == "embed" and slot.lm_head is not None:
                continue
            total += sum(s.data.nbytes for s in a.addressable_shards if s.device == dev)
    for w in jax.tree.leaves(lane.params.groups):
        total += sum(s.data.nbytes for s in w.addressable_shards if s.device == dev)
    for a in (lane.params.attn_norm, lane.params.mlp_norm, lane.params.final_norm):
        total += sum(s.data.nbytes for s in a.addressable_shards if s.device == dev)
    return total


def profile_step(lane, inputs, steps=5) -> tuple[list[dict], dict]:
    """GPU kernel time and launches per step by kernel name (top 15), from a jax.profiler trace of `steps` steps
    enqueued back to back and waited for once (as `time_pipelined` and the engine's chained decode
    run them); and that trace's timeline per step: from the first kernel's start to the last one's
    end (`window_ms`), with a kernel running (`busy_ms`) or none (`idle_ms`), and the longest idle
    gaps with the kernels on either side, so that a step longer than its kernels says where."""
    out_dir = tempfile.mkdtemp()
    jax.block_until_ready(lane.dispatch(*inputs))
    with jax.profiler.trace(out_dir):
        for _ in range(steps):
            out = lane.dispatch(*inputs)
        jax.block_until_ready((out, lane.kv))
    files = glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True)
    data = jax.profiler.ProfileData.from_file(files[0])
    per_name: dict[str, float] = {}
    launches: dict[str, int] = {}
    events: list[tuple[int, int, str]] = []
    gpu0 = str(lane.devices[0].id)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:") or not plane.name.endswith(gpu0):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower() or "xla" in line.name.lower():
                continue
            for ev in line.events:
                per_name[ev.name] = per_name.get(ev.name, 0.0) + ev.duration_ns / 1e6 / steps
                launches[ev.name] = launches.get(ev.name, 0) + 1
                events.append((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name))
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:15]
    # every kernel together (ms a step, summed over streams: overlapping streams can exceed the step)
    total = {"kernel": "(all kernels, GPU %s)" % gpu0, "ms_per_step": round(sum(per_name.values()), 4),
             "launches_per_step": sum(launches.values()) / steps}
    return [total] + [{"kernel": k[:120], "ms_per_step": round(v, 4), "launches_per_step": launches[k] / steps}
                      for k, v in top], timeline(events, steps)


def timeline(events: list[tuple[int, int, str]], steps: int) -> dict:
    """Busy and idle time of a trace's kernels (start ns, end ns, name), per step: the union of
    their intervals (`trace_summary.merge`), and the gaps between its pieces with the kernels on
    either side."""
    if not events:
        return {}
    merged = merge([(a, b) for a, b, _ in events])
    ending = {b: name for a, b, name in events}
    starting: dict[int, str] = {}
    for a, _, name in sorted(events):
        starting.setdefault(a, name)
    gaps = sorted(((nxt[0] - cur[1], ending[cur[1]], starting[nxt[0]]) for cur, nxt in zip(merged, merged[1:])),
                  reverse=True)
    window, busy = merged[-1][1] - merged[0][0], sum(b - a for a, b in merged)
    return {"steps": steps, "window_ms": round(window / 1e6 / steps, 4), "busy_ms": round(busy / 1e6 / steps, 4),
            "idle_ms": round((window - busy) / 1e6 / steps, 4), "gaps": len(gaps),
            "gaps_over_10us": sum(g > 10_000 for g, _, _ in gaps),
            "longest": [{"us": round(g / 1e3, 1), "after": x[:80], "before": y[:80]} for g, x, y in gaps[:8]]}


def profile_lane(results, ps, impl, chunks, tp, batch, batches, context, rng) -> None:
    """The kernel profile of one decode step of the lane of degree `tp`, into results["profiles"]."""
    lane = next((l for l in ps.lanes.values() if l.spec.tp == tp), None)
    if lane is None or batch not in batches:
        return
    try:
        key = f"{impl}_tp{tp}_c{chunks}_b{batch}"
        results["profiles"][key], results["timelines"][key] = prof, tl = profile_step(
            lane, decode_inputs(lane, batch, context, rng))
        print(f"profile {impl} tp{tp} c{chunks} b{batch} (ms per step, steps back to back):")
        for p in prof:
            print(f"  {p['ms_per_step']:8.3f}  {p['kernel']}")
        if tl:
            print(f"  timeline: {tl['window_ms']:.3f} ms a step, kernels busy {tl['busy_ms']:.3f}, idle "
                  f"{tl['idle_ms']:.3f} in {tl['gaps']} gaps ({tl['gaps_over_10us']} over 10 us); longest: "
                  + ", ".join(f"{g['us']:.0f} us after {g['after'][:40]}" for g in tl["longest"][:3]))
    except Exception as e:
        print(f"profile failed: {type(e).__name__}: {e}")


def chunked_lanes(cfg, chunks: int, num_pages: int, grid, knobs) -> dict:
    """A TP1 lane on the first device holding `chunks` weight chunks, as a lane of a plan set with
    TP up to `chunks` holds them (one run of every chunk per weight, `layout.weight_runs`), built
    on one device."""
    from jax.sharding import Mesh

    from nitsum_jax.model import ChunkLayout
    from nitsum_jax.plans import Lane
    from nitsum_jax.plans.spec import LaneSpec
    from nitsum_jax.plans.weights import WeightStore

    from nitsum_jax.plans.layout import weight_runs

    devices = jax.devices()[:1]
    runs = weight_runs({(0,): ChunkLayout(chunks, (tuple(range(chunks)),))})  # one run of every chunk
    store = WeightStore.random(cfg, runs, devices)
    spec = LaneSpec(("all",), 1, (0,))
    mesh = Mesh(np.array(devices), ("tp",))
    lane = Lane(f"tp1@0/c{chunks}", spec, cfg, runs.layouts[(0,)], mesh, store.lane_params((0,), mesh), num_pages,
                16, grid, knobs)
    lane.compile()
    return {(0,): lane}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--tps", default="1,2,4")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--impls", default="kernel,reference")
    ap.add_argument("--reference-batches", default="8,64")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--profile", default="1:32", help="TP:BATCH[,TP:BATCH...] to profile (kernel times)")
    ap.add_argument("--copy-gib", type=float, default=None,
                    help=f"copy buffer for the bandwidth figure (default {copy_bandwidth.GPU_GIB:g} GiB on a GPU, "
                         f"{copy_bandwidth.HOST_GIB:g} on host devices)")
    ap.add_argument("--chunks", default="1", help="weight-chunk slots of the TP1 lane, one run each: 1 is a "
                    "one-chunk plan set; C > 1 builds on one device the lane of a plan set with TP up to C")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = preset(args.preset)
    tps = [int(t) for t in args.tps.split(",")]
    plans = parse_plans("; ".join(f"t{t}: all=tp{t}@{'0' if t == 1 else f'0-{t - 1}'}" for t in tps))
    copies = copy_bandwidth.measure(jax.devices()[0], args.copy_gib)
    bw, spec = copies["GBps"] * 1e9, copies["spec_GBps"]
    for way, w in copies["ways"].items():
        print(f"copy {copies['buffer_GiB']:g} GiB, {way:9s}: " + (
            f"{w['GBps']:6.0f} GB/s median, {w['best_GBps']:6.0f} best, contents equal {w['equal']}"
            if "GBps" in w else w["error"]), flush=True)
    print(f"MBU denominator: {bw / 1e9:.0f} GB/s ({copies['best']}); spec sheet "
          f"{f'{spec:.0f} GB/s' if spec else 'unknown for this card'}", flush=True)
    per_token = kv_bytes_per_page(cfg, 1)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": args.preset,
               "context": args.context, "max_seq_len": args.max_seq_len, "hbm_GBps": bw / 1e9,
               "copy_bandwidth": copies, "rows": [], "profiles": {}, "timelines": {}}
    rng = np.random.default_rng(0)
    # "chunked": the kernel impl on a TP1 lane of C chunk slots built on one device (--chunks)
    runs = [(impl, 1) for impl in args.impls.split(",") if impl != "none"] + [("chunked", int(c)) for c in args.chunks.split(",")
                                                               if int(c) > 1]
    for impl, chunks in runs:
        # kernel: Pallas attention (decode through the fused decode kernel) + our XLA step options;
        # paged: decode through the paged-attention kernel with RoPE and the KV write as XLA ops
        # (the earlier path); reference: plain-JAX attention, same options; xla_default: Pallas
        # attention with XLA's default options (the earlier baseline).
        # oneshot: as kernel, plus XLA's own one-shot all-reduce kernel for the small all-reduces
        # of TP>1 decode (in place of NCCL).
        one_shot = (("xla_gpu_unsupported_use_all_reduce_one_shot_kernel", True),) if impl == "oneshot" else ()
        attention = {"reference": "reference", "paged": "paged"}.get(impl, "auto")
        knobs = dataclasses.replace(settings(), attention=attention,
                                    xla_options=impl != "xla_default", xla_extra_options=one_shot)
        batches = [int(b) for b in (args.reference_batches if impl in ("reference", "xla_default") else args.batches).split(",")]
        pages = max(batches) * -(-args.context // 16) + 64
        grid = BucketGrid(decode_batch=tuple(batches), prefill_len=(), max_seq_len=args.max_seq_len,
                          min_move_pages=args.max_seq_len // 16)
        t0 = time.perf_counter()
        try:
            if chunks > 1:
                ps = argparse.Namespace(lanes=chunked_lanes(cfg, chunks, pages, grid, knobs))
            else:
                ps = PlanSet(cfg, None, plans, num_pages=pages, page_size=16, grid=grid, settings=knobs)
        except Exception as e:  # report and go on with the other impl
            print(f"{impl}: start-up failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            results[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:4000]}"
            continue
        print(f"{impl}: start-up {time.perf_counter() - t0:.1f}s", flush=True)
        for i, lane in enumerate(ps.lanes.values()):
            fill_random(lane, i)
        for lane in ps.lanes.values():
            wbytes = weight_bytes_read(lane)
            for b in batches:
                # the same inputs for every impl, so their tokens and log-probabilities compare
                inputs = decode_inputs(lane, b, args.context, np.random.default_rng(1000 * lane.spec.tp + b))
                t, spread = time_step(lane, inputs, args.repeats)
                piped = time_pipelined(lane, inputs, args.repeats)
                tokens, logprobs = jax.device_get(lane.dispatch(*inputs))
                kv = b * args.context * per_token / lane.spec.tp
                floor = (wbytes + kv) / bw
                row = {"impl": impl, "chunks": lane.layout.slots, "tp": lane.spec.tp, "batch": b, "step_ms": t * 1e3, "spread_ms": spread * 1e3,
                       "weight_GB_per_device": wbytes / 1e9, "kv_GB_per_device": kv / 1e9,
                       "floor_ms": floor * 1e3, "mbu": floor / t,
                       "temp_GB": lane._steps[(b, 1)].memory_analysis().temp_size_in_bytes / 1e9,
                       "pipelined_step_ms": piped * 1e3, "pipelined_mbu": floor / piped,
                       "mbu_spec": (wbytes + kv) / (spec * 1e9) / t if spec else None, "tokens_per_s": b / t,
                       "tokens": tokens.tolist(), "logprobs": [round(float(x), 4) for x in logprobs]}
                results["rows"].append(row)
                mbu_spec = f"{row['mbu_spec']:.1%}" if spec else "-"
                print(f"{impl:9s} tp{lane.spec.tp} c{lane.layout.slots} b{b:3d}: {t * 1e3:7.2f} ms (spread {spread * 1e3:.2f}) "
                      f"floor {floor * 1e3:6.2f} ms  MBU {floor / t:5.1%} (spec sheet: {mbu_spec})  "
                      f"{b / t:8.0f} tok/s; back to back {piped * 1e3:7.2f} ms, MBU {floor / piped:5.1%}", flush=True)
        for ptp, pb in ([int(x) for x in p.split(":")] for p in args.profile.split(",") if p):
            profile_lane(results, ps, impl, chunks, ptp, pb, batches, args.context, rng)
        ps = lane = inputs = None  # the next impl's lanes need the memory (the loop names hold it too)
        gc.collect()
    by_key: dict = {}
    for row in results["rows"]:  # every impl against the first one measured, same tp and batch
        first = by_key.setdefault((row["tp"], row["batch"], row["chunks"]), row)
        if first is not row:
            same = np.mean(np.array(row["tokens"]) == np.array(first["tokens"]))
            diff = np.max(np.abs(np.array(row["logprobs"]) - np.array(first["logprobs"])))
            row["vs_" + first["impl"]] = {"same_tokens": float(same), "max_logprob_diff": float(diff)}
            print(f"{row['impl']} tp{row['tp']} b{row['batch']} vs {first['impl']}: tokens equal {same:.0%}, "
                  f"max |logprob diff| {diff:.4f}", flush=True)
    if args.out:
        results["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        with open(f"{args.out}/gpu_step{args.tag}.json", "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
