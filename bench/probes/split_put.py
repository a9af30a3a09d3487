"""Session 6 probe (BENCHMARKS.md, KV moves): does one device pair's transfer go faster when the
same bytes are sent as k arrays in one batched `jax.device_put` (the runtime spreads copies over
its device-to-device streams) instead of one array? GPU 0 -> GPU 1, sources ready, k = 1, 2, 4, 8;
raw `cuMemcpyPeerAsync` of the whole buffer for reference; medians of 15, contents checked.
    PYTHONPATH=. python bench/probes/split_put.py
(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/probes/split_put.py --mb 8)
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from cuda_peer_copy import PeerCopier, driver  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--mb", default="537,134")
ap.add_argument("--repeats", type=int, default=15)
args = ap.parse_args()
a, b = jax.devices()[:2]
copier = PeerCopier([a, b]) if driver() is not None and a.platform == "gpu" else None
print(a.device_kind)
for mb in (float(m) for m in args.mb.split(",")):
    n = int(mb * 1e6 / 4) // 8 * 8
    for k in (1, 2, 4, 8):
        parts = [jax.device_put(jax.random.bits(jax.random.key(i), (n // k,), jnp.uint32), a) for i in range(k)]
        times = []
        for i in range(args.repeats + 2):
            jax.block_until_ready(parts)
            t0 = time.perf_counter()
            out = jax.device_put(parts, [b] * k)
            jax.block_until_ready(out)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        ok = all(bool(jnp.array_equal(jax.device_put(o, a), p)) for o, p in zip(out, parts))
        t = statistics.median(times)
        print(f"{n * 4 / 1e6:.0f} MB as {k} arrays: {t * 1e3:.3f} ms, {n * 4 / t / 1e9:.0f} GB/s, equal {ok}", flush=True)
    if copier is not None:
        x = jax.device_put(jax.random.bits(jax.random.key(9), (n,), jnp.uint32), a)
        y = jax.device_put(jnp.zeros((n,), jnp.uint32), b)
        times = []
        for i in range(args.repeats + 2):
            t0 = time.perf_counter()
            copier.copy([(x, y)])
            if i >= 2:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"{n * 4 / 1e6:.0f} MB raw peer copy: {t * 1e3:.3f} ms, {n * 4 / t / 1e9:.0f} GB/s, "
              f"equal {bool(jnp.array_equal(jax.device_put(y, a), x))}", flush=True)
# The move's shape: a producer on GPU 0 writes the k arrays (like the page gather), one batched
# device_put, a consumer on GPU 1 reads them all (like the scatter); from the first call to the end.
for mb in (float(m) for m in args.mb.split(",")):
    n = int(mb * 1e6 / 4) // 8 * 8
    src = jax.device_put(jax.random.bits(jax.random.key(3), (n,), jnp.uint32), a)
    for k in (1, 2, 4, 8):
        produce = jax.jit(lambda v, k=k: tuple(p ^ jnp.uint32(1) for p in jnp.split(v, k))).lower(src).compile()
        shapes = [jax.ShapeDtypeStruct((n // k,), jnp.uint32, sharding=jax.sharding.SingleDeviceSharding(b))] * k
        consume = jax.jit(lambda *ps: jnp.concatenate(ps) ^ jnp.uint32(1)).lower(*shapes).compile()
        times = []
        for i in range(args.repeats + 2):
            jax.block_until_ready(src)
            t0 = time.perf_counter()
            out = consume(*jax.device_put(list(produce(src)), [b] * k))
            jax.block_until_ready(out)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        ok = bool(jnp.array_equal(jax.device_put(out, a), src))
        print(f"pipeline {n * 4 / 1e6:.0f} MB as {k} arrays: {t * 1e3:.3f} ms, {n * 4 / t / 1e9:.0f} GB/s, "
              f"equal {ok}", flush=True)
