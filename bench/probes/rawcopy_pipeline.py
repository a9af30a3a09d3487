"""Session 5 probe (BENCHMARKS.md, KV moves): raw cuMemcpyPeerAsync (pipeline) against jax.device_put, 2 GPUs.
    PYTHONPATH=. python bench/probes/rawcopy_pipeline.py"""
import time, statistics, jax, jax.numpy as jnp
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from cuda_peer_copy import PeerCopier
a, b = jax.devices()[:2]
n = int(537e6 / 4)
x = jax.device_put(jax.random.bits(jax.random.key(0), (n,), jnp.uint32), a)
y = jax.device_put(jnp.zeros((n,), jnp.uint32), b)
c = PeerCopier([a, b])
produce = jax.jit(lambda v: v ^ jnp.uint32(0)).lower(x).compile()
consume = jax.jit(lambda v: v ^ jnp.uint32(0)).lower(y).compile()
rows = []
for i in range(15):
    jax.block_until_ready((x, y))
    t0 = time.perf_counter()
    p = produce(x); t1 = time.perf_counter()
    jax.block_until_ready(p); t2 = time.perf_counter()
    c.copy([(p, y)]); t3 = time.perf_counter()
    r = consume(y); t4 = time.perf_counter()
    jax.block_until_ready(r); t5 = time.perf_counter()
    rows.append([t1-t0, t2-t0, t3-t0, t4-t0, t5-t0])
    del p, r
med = [round(statistics.median(col)*1e3, 3) for col in zip(*rows)]
print("cuda: dispatch produce, produce ready, copied, dispatch consume, done (ms):", med)
rows = []
for i in range(15):
    jax.block_until_ready((x, y))
    t0 = time.perf_counter()
    p = produce(x); t1 = time.perf_counter()
    z = jax.device_put(p, b); t2 = time.perf_counter()
    r = consume(z); t3 = time.perf_counter()
    jax.block_until_ready(z); t4 = time.perf_counter()
    jax.block_until_ready(r); t5 = time.perf_counter()
    rows.append([t1-t0, t2-t0, t3-t0, t4-t0, t5-t0])
    del p, r, z
med = [round(statistics.median(col)*1e3, 3) for col in zip(*rows)]
print("device_put: dispatch produce, put returned, consume dispatched, landed, done (ms):", med)
