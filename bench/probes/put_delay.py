"""Session 6 probe (BENCHMARKS.md, KV moves): where does a move into or out of one GPU lose time
on 4 GPUs? The shapes of TP4 -> TP1 (three 134 MB pieces from GPUs 0-2 into GPU 3) and TP1 -> TP4
(three pieces from GPU 0 out to GPUs 1-3), each piece sent by `jax.device_put`:

  ready        sources already computed; one batched device_put; wait for all pieces
  threads      the same pieces, one device_put per piece, each from its own thread
  one          only one of the pieces (one device pair), for the link's own speed
  pipeline     a producer program on each source (a read + write pass, like the page gather), then
               one batched device_put, then a consumer program on each destination (like the
               scatter), dispatched at once; wait for the consumers
  pipeline_sync  the same, but the host waits for the producers before device_put
  raw          sources ready, `cuMemcpyPeerAsync` (bench/cuda_peer_copy.py) into landing arrays made
               beforehand, one stream per device pair; returns when every copy is complete (GPU only)

Host times of each call (ms from the start) and the time all data landed, medians of 15.
    PYTHONPATH=. python bench/probes/put_delay.py [--mb 134]
(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/probes/put_delay.py --mb 4)
"""
import argparse
import statistics
import threading
import time

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from cuda_peer_copy import PeerCopier, driver  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--mb", type=float, default=134.0)
ap.add_argument("--repeats", type=int, default=15)
args = ap.parse_args()
devs = jax.devices()[:4]
n = int(args.mb * 1e6 / 4)
base = jax.random.bits(jax.random.key(0), (n,), jnp.uint32)
on = {d: jax.device_put(base, d) for d in devs}
produce = {d: jax.jit(lambda v: v ^ jnp.uint32(1)).lower(on[d]).compile() for d in devs}
consume = {d: jax.jit(lambda v: v ^ jnp.uint32(1)).lower(on[d]).compile() for d in devs}
shapes = {"into_one (TP4->TP1)": [(devs[i], devs[3]) for i in range(3)],
          "out_of_one (TP1->TP4)": [(devs[0], devs[j]) for j in (1, 2, 3)]}


def ms(t, t0):
    return (t - t0) * 1e3


def ready(pairs):
    xs = [on[s] for s, _ in pairs]
    t0 = time.perf_counter()
    ys = jax.device_put(xs, [d for _, d in pairs])
    t1 = time.perf_counter()
    jax.block_until_ready(ys)
    return [ms(t1, t0), ms(time.perf_counter(), t0)], ys


def threads(pairs):
    out = [None] * len(pairs)

    def put(i, s, d):
        out[i] = jax.device_put(on[s], d)
    t0 = time.perf_counter()
    ts = [threading.Thread(target=put, args=(i, s, d)) for i, (s, d) in enumerate(pairs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    return [ms(t1, t0), ms(time.perf_counter(), t0)], out


def one(pairs):
    return ready(pairs[:1])


def pipeline(pairs, sync=False):
    t0 = time.perf_counter()
    ps = [produce[s](on[s]) for s, _ in pairs]
    t1 = time.perf_counter()
    if sync:
        jax.block_until_ready(ps)
    t2 = time.perf_counter()
    ys = jax.device_put(ps, [d for _, d in pairs])
    t3 = time.perf_counter()
    rs = [consume[d](y) for (_, d), y in zip(pairs, ys)]
    t4 = time.perf_counter()
    jax.block_until_ready(ys)
    t5 = time.perf_counter()
    jax.block_until_ready(rs)
    t6 = time.perf_counter()
    return [ms(t, t0) for t in (t1, t2, t3, t4, t5, t6)], rs


copier = PeerCopier(devs) if driver() is not None and devs[0].platform == "gpu" else None
landing = {(s, d): jax.device_put(jnp.zeros((n,), jnp.uint32), d) for pairs in shapes.values() for s, d in pairs}


def raw(pairs):
    t0 = time.perf_counter()
    copier.copy([(on[s], landing[(s, d)]) for s, d in pairs])
    return [ms(time.perf_counter(), t0)], None


ways = {"raw": ["copied"], "ready": ["put returned", "landed"], "threads": ["threads joined", "landed"],
        "one": ["put returned", "landed"],
        "pipeline": ["produce dispatched", "(no sync)", "put returned", "consume dispatched", "landed", "done"],
        "pipeline_sync": ["produce dispatched", "produce ready", "put returned", "consume dispatched", "landed",
                          "done"]}
print(f"{devs[0].device_kind}, {n * 4 / 1e6:.0f} MB a piece, medians of {args.repeats} (ms from the start)")
for shape, pairs in shapes.items():
    for way, labels in ways.items():
        if way == "raw" and copier is None:
            continue
        fn = {"raw": raw, "ready": ready, "threads": threads, "one": one, "pipeline": pipeline,
              "pipeline_sync": lambda p: pipeline(p, True)}[way]
        rows = []
        for i in range(args.repeats + 2):
            jax.block_until_ready(list(on.values()))
            time.sleep(0.002)
            row, res = fn(pairs)
            if i >= 2:
                rows.append(row)
            del res
        med = [statistics.median(c) for c in zip(*rows)]
        pieces = 1 if way == "one" else len(pairs)
        gbps = pieces * n * 4 / 1e6 / med[-1] if way in ("raw", "ready", "threads", "one") else None
        text = ", ".join(f"{lab} {m:.3f}" for lab, m in zip(labels, med))
        print(f"{shape:22s} {way:14s} {text}" + (f"  ({gbps:.0f} GB/s)" if gbps else ""), flush=True)
# contents: a piece that went GPU0 -> GPU3 equals the source
y = jax.device_put(on[devs[0]], devs[3])
print("equal", bool(jnp.array_equal(jax.device_put(y, devs[0]), on[devs[0]])))
