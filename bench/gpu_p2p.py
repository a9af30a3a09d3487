"""One device pair, the same bytes two ways: `jax.device_put` (the runtime's copy engine path
the KV moves use) against a compiled `ppermute` over a two-device mesh (NCCL inside one XLA
program). Wall time from the call to the data being ready, median of 20, and both results
checked equal. Tells whether moving KV inside one program would save the start latency of
`device_put` (BENCHMARKS.md, session 3).

    PYTHONPATH=. python bench/gpu_p2p.py --mb 537
(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/gpu_p2p.py --mb 8)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gpu_plans import report  # bench/ is on sys.path when run as a script


def median_ms(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=537.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    a, b = jax.devices()[:2]
    n = int(args.mb * 1e6 / 4)
    x = jax.device_put(jax.random.bits(jax.random.key(0), (n,), jnp.uint32), a)
    results = {"device": a.device_kind, "MB": n * 4 / 1e6}
    results["device_put_ms"] = median_ms(lambda: jax.device_put(x, b), args.repeats)
    mesh = Mesh(np.array([a, b]), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    stage = jax.device_put(jnp.zeros((n,), jnp.uint32), b)  # the receiver's (unused) half of the input

    def send(v):
        return jax.lax.ppermute(v, "x", perm=[(0, 1)])

    program = jax.jit(jax.shard_map(send, mesh=mesh, in_specs=P("x"), out_specs=P("x"))).lower(
        jax.ShapeDtypeStruct((2 * n,), jnp.uint32, sharding=sharding)).compile()

    def nccl():
        both = jax.make_array_from_single_device_arrays((2 * n,), sharding, [x, stage])
        return program(both)

    results["ppermute_ms"] = median_ms(nccl, args.repeats)
    got = next(s.data for s in nccl().addressable_shards if s.device == b)
    results["equal"] = bool(jnp.array_equal(jax.device_put(got, a), x))
    for k in ("device_put", "ppermute"):
        results[f"{k}_GBps"] = results["MB"] / results[f"{k}_ms"]
    report(results, args.out, "gpu_p2p")


if __name__ == "__main__":
    main()
