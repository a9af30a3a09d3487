"""Session 5 probe (BENCHMARKS.md, KV moves): raw cuMemcpyPeerAsync (alone) against jax.device_put, 2 GPUs.
    PYTHONPATH=. python bench/probes/rawcopy_alone.py"""
import time, statistics, jax, jax.numpy as jnp
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from cuda_peer_copy import PeerCopier
a, b = jax.devices()[:2]
for mb in (537, 134):
    n = int(mb * 1e6 / 4)
    x = jax.device_put(jax.random.bits(jax.random.key(0), (n,), jnp.uint32), a)
    y = jax.device_put(jnp.zeros((n,), jnp.uint32), b)
    c = PeerCopier([a, b])
    def t(f, k=15):
        ts = []
        for _ in range(k):
            jax.block_until_ready((x, y)); t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        return round(statistics.median(ts) * 1e3, 3)
    c.copy([(x, y)])
    print(mb, "equal", bool(jnp.array_equal(jax.device_put(y, a), x)))
    print(mb, "raw copy ms", t(lambda: c.copy([(x, y)])))
    print(mb, "device_put ms", t(lambda: jax.block_until_ready(jax.device_put(x, b))))
    f = jax.jit(lambda v: v ^ jnp.uint32(0)).lower(x).compile()
    print(mb, "produce ms", t(lambda: jax.block_until_ready(f(x))))
    print(mb, "block ready ms", t(lambda: jax.block_until_ready(x)))
