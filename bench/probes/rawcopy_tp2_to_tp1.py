"""Session 5 probe (BENCHMARKS.md, KV moves): raw cuMemcpyPeerAsync (tp2_to_tp1) against jax.device_put, 2 GPUs.
    PYTHONPATH=. python bench/probes/rawcopy_tp2_to_tp1.py"""
import time, statistics, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/
from cuda_peer_copy import PeerCopier
a, b = jax.devices()[:2]
n = int(537e6 / 4)
mesh = Mesh(np.array([a, b]), ("x",))
both = NamedSharding(mesh, P("x"))
x = jax.device_put(jax.random.bits(jax.random.key(0), (n,), jnp.uint32), both)
produce = jax.jit(jax.shard_map(lambda v: v ^ jnp.uint32(0), mesh=mesh, in_specs=P("x"), out_specs=P("x"))).lower(x).compile()
half = n // 2
consume = jax.jit(lambda u, v: jnp.concatenate([u, v]) ^ jnp.uint32(0)).lower(
    jax.ShapeDtypeStruct((half,), jnp.uint32, sharding=jax.sharding.SingleDeviceSharding(b)),
    jax.ShapeDtypeStruct((half,), jnp.uint32, sharding=jax.sharding.SingleDeviceSharding(b))).compile()
y = jax.device_put(jnp.zeros((half,), jnp.uint32), b)
c = PeerCopier([a, b])
def shards(p):
    d = {s.device: s.data for s in p.addressable_shards}
    return d[a], d[b]
for way in ("device_put", "device_put_sync", "cuda", "device_put", "cuda"):
    rows = []
    for i in range(15):
        jax.block_until_ready((x, y))
        t0 = time.perf_counter()
        p = produce(x); t1 = time.perf_counter()
        pa, pb = shards(p)
        if way == "cuda":
            c.copy([(pa, y)]); landed = (y, pb)
        else:
            if way == "device_put_sync":
                jax.block_until_ready(p)
            landed = jax.device_put([pa, pb], [b, b])
        t2 = time.perf_counter()
        r = consume(*landed); t3 = time.perf_counter()
        jax.block_until_ready(landed); t4 = time.perf_counter()
        jax.block_until_ready(r); t5 = time.perf_counter()
        rows.append([t1-t0, t2-t0, t3-t0, t4-t0, t5-t0])
        del p, r, landed, pa, pb
    med = [round(statistics.median(col)*1e3, 3) for col in zip(*rows)]
    print(way, "TP2->TP1 half move: produce dispatched, sent, consume dispatched, landed, done (ms):", med)
