"""How should a KV move cross from one GPU to another? A producer program on GPU a (stands for
the page gather), the transfer, and a consumer program on GPU b (stands for the scatter), timed
from the first call until the consumer's result is ready, median of N, contents checked.

Transfers compared:
  device_put   `jax.device_put(x, b)` (the runtime's copy path the moves use today)
  nccl         a compiled `ppermute` over a mesh of (a, b): NCCL inside one XLA program
  memcpy       the same program compiled with `xla_gpu_use_memcpy_local_p2p` (copy engine
               inside the program, no NCCL kernel)
  nccl32       the NCCL program with `xla_gpu_nccl_p2p_max_nchannels=32`
  cuda         `cuMemcpyPeerAsync` into a landing buffer on b, issued by the host once the
               producer is done (nitsum_jax/plans/cuda_copy.py; GPU only)
each with the bytes split into 1, 2 or 4 pieces (all producers first, then transfers, then
consumers), so a piece's transfer can overlap the next piece's producer and the previous piece's
consumer.

    PYTHONPATH=. python bench/gpu_transfer.py --mb 537
(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/gpu_transfer.py --mb 8 --repeats 3)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from cuda_peer_copy import CudaError, PeerCopier
from gpu_plans import report  # bench/ is on sys.path when run as a script


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=537.0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--pieces", default="1,2,4")
    ap.add_argument("--ways", default="device_put,cuda,nccl,memcpy,nccl32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    a, b = jax.devices()[:2]
    n = int(args.mb * 1e6 / 4)
    source = jax.device_put(jax.random.bits(jax.random.key(0), (n,), jnp.uint32), a)
    mesh = Mesh(np.array([a, b]), ("x",))
    both = NamedSharding(mesh, P("x"))
    results = {"device": a.device_kind, "MB": n * 4 / 1e6, "runs": {}}

    for pieces in [int(p) for p in args.pieces.split(",")]:
        m = n // pieces
        # producer: a read + write pass over its piece on a (like the page gather)
        produce = jax.jit(lambda x, i: jax.lax.dynamic_slice(x, (i * m,), (m,)) ^ jnp.uint32(0)).lower(
            source, 0).compile()
        consume = jax.jit(lambda y: y ^ jnp.uint32(0)).lower(  # like the scatter
            jax.ShapeDtypeStruct((m,), jnp.uint32, sharding=SingleDeviceSharding(b))).compile()

        def send(v):
            return jax.lax.ppermute(v, "x", perm=[(0, 1)])

        abstract = jax.ShapeDtypeStruct((2 * m,), jnp.uint32, sharding=both)
        lowered = jax.jit(jax.shard_map(send, mesh=mesh, in_specs=P("x"), out_specs=P("x")),
                          donate_argnums=0).lower(abstract)
        programs = {}
        for way, options in (("nccl", {}), ("memcpy", {"xla_gpu_use_memcpy_local_p2p": True}),
                             ("nccl32", {"xla_gpu_nccl_p2p_max_nchannels": 32})):
            try:
                programs[way] = lowered.compile(compiler_options=options)
            except Exception as e:  # an option this XLA does not know is reported, not fatal
                results["runs"][f"{way} x{pieces}"] = {"error": f"compile: {str(e)[:200]}"}

        def move(way, stages):
            parts = [produce(source, i) for i in range(pieces)]
            if way == "device_put":
                landed = jax.device_put(parts, [b] * pieces)
            elif way == "cuda":
                landed = list(stages)
                copier.copy(list(zip(parts, landed)))
            else:
                landed = []
                for p in parts:
                    # the receiver's half of the input (donated: its buffer becomes the output)
                    out = programs[way](jax.make_array_from_single_device_arrays(
                        (2 * m,), both, [p, stages.pop()]))
                    landed.append(next(s.data for s in out.addressable_shards if s.device == b))
            return [consume(y) for y in landed]

        copier = None
        if "cuda" in args.ways.split(","):
            try:
                copier = PeerCopier([a, b])
            except CudaError as e:
                results["runs"][f"cuda x{pieces}"] = {"error": str(e)}
        for way in args.ways.split(","):
            if way not in ("device_put", "cuda") and way not in programs or way == "cuda" and copier is None:
                continue
            def run_once():  # landing blocks are made (and finished) before the clock starts
                stages = jax.block_until_ready([jax.device_put(jnp.zeros((m,), jnp.uint32), b)
                                                for _ in range(pieces)])
                t0 = time.perf_counter()
                got = jax.block_until_ready(move(way, stages))
                return got, time.perf_counter() - t0

            try:
                got, _ = run_once()
                equal = bool(jnp.array_equal(jnp.concatenate([jax.device_put(g, a) for g in got]),
                                             source[:m * pieces]))
                times = []
                for _ in range(args.repeats):
                    times.append(run_once()[1])
                ms = statistics.median(times) * 1e3
                results["runs"][f"{way} x{pieces}"] = {"ms": round(ms, 3), "GBps": round(m * pieces * 4 / 1e6 / ms, 1),
                                                       "equal": equal}
            except Exception as e:  # a way this runtime cannot do is reported, not fatal
                results["runs"][f"{way} x{pieces}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{way} x{pieces}: {results['runs'][f'{way} x{pieces}']}", flush=True)
    report(results, args.out, "gpu_transfer")


if __name__ == "__main__":
    main()
