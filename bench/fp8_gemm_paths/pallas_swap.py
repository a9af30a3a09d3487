"""Swap-AB Pallas fp8 gemm: the weight tile [bn, bk] is the dot's M side (wgmma-sized), the rows of
x are its N side; stacked weight [L, N, K], K contiguous; fp8 x fp8 and upcast variants."""
import functools, itertools, json, os, time
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

L = 32
FP8 = jnp.float8_e4m3fn
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate": (4096, 14336), "down": (14336, 4096)}
OPTS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_dynamic_slice_fusion": True}
odir = os.environ.get("OUT", "/tmp")
out = []

def timed(c, *a):
    for _ in range(3):
        jax.block_until_ready(c(*a))
    ts = []
    for _ in range(10):
        t = time.perf_counter(); jax.block_until_ready(c(*a)); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

def qrows(x):
    s = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True), 1e-12) / 448.0
    return (x.astype(jnp.float32) / s).astype(FP8), s

def kern(layer_ref, x_ref, q_ref, o_ref, *, n_dim, bn, bk, steps, fp8x):
    n0 = pl.program_id(1) * bn
    split = pl.program_id(2)
    k_start = split * steps * bk
    row0 = layer_ref[0] * n_dim + n0
    def body(i, acc):
        k0 = pl.multiple_of(k_start + i * bk, bk)
        x = x_ref[:, pl.ds(k0, bk)]  # [bm, bk]
        w = q_ref[pl.ds(row0, bn), pl.ds(k0, bk)]  # [bn, bk]
        if not fp8x:
            w = w.astype(x.dtype)
        return acc + jnp.dot(w, x.T, preferred_element_type=jnp.float32)  # [bn, bm]
    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((bn, x_ref.shape[0]), jnp.float32))

def gemm(x, q, layer, *, bm, bn, bk, splits, stages, warps, fp8x):
    M, K = x.shape
    Lq, N, _ = q.shape
    mb = -(-M // bm)
    xp = jnp.pad(x, ((0, mb * bm - M), (0, 0)))
    steps = K // (bk * splits)
    o = pl.pallas_call(
        functools.partial(kern, n_dim=N, bn=bn, bk=bk, steps=steps, fp8x=fp8x),
        grid=(mb, N // bn, splits),
        in_specs=[pl.BlockSpec((1,), lambda i, j, s: (0,)), pl.BlockSpec((bm, K), lambda i, j, s: (i, 0)),
                  pl.BlockSpec((Lq * N, K), lambda i, j, s: (0, 0))],
        out_specs=pl.BlockSpec((None, bn, bm), lambda i, j, s: (s, j, i)),
        out_shape=jax.ShapeDtypeStruct((splits, N, mb * bm), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
    )(layer.reshape(1), xp, q.reshape(Lq * N, K))
    return o.sum(0).T[:M]

def splits_for(M, N, K, bm, bn, bk, target):
    p = -(-M // bm) * (N // bn); s = 1
    while p * s < target and s < 16 and K % (bk * s * 2) == 0 and K // (bk * s * 2) >= 2:
        s *= 2
    return s

key = jax.random.key(0)
for name, (K, N) in SHAPES.items():
    qnk = (jax.random.normal(key, (L, N, K), jnp.float32) * 8).astype(FP8)
    for M in (1, 8, 32, 64, 128, 256):
        x = jax.random.normal(key, (M, K), jnp.float32).astype(jnp.bfloat16)
        for fp8x in (True, False):
            bm = min(128, max(16, 1 << (M - 1).bit_length()))
            cfgs = [(64, 256, 3, 4, 264), (128, 128, 3, 4, 264), (128, 256, 3, 8, 264), (64, 128, 4, 4, 528), (64, 512, 2, 4, 264)]
            if M > 8 and name in ("o", "qkv"):
                cfgs = cfgs[:3]
            for bn, bk, stages, warps, target in cfgs:
                splits = splits_for(M, N, K, bm, bn, bk, target)
                def scanned(x, q):
                    def body(acc, l):
                        if fp8x:
                            x8, sx = qrows(x)
                            y = gemm(x8, q, l, bm=bm, bn=bn, bk=bk, splits=splits, stages=stages, warps=warps, fp8x=True) * sx
                        else:
                            y = gemm(x, q, l, bm=bm, bn=bn, bk=bk, splits=splits, stages=stages, warps=warps, fp8x=False)
                        return acc + y[:, :8].sum(), None
                    return lax.scan(body, jnp.float32(0), jnp.arange(L))[0]
                way = f"swap_{'f8f8' if fp8x else 'upcast'}"
                try:
                    c = jax.jit(scanned).lower(x, qnk).compile(compiler_options=OPTS)
                    t = timed(c, x, qnk)
                    r = {"shape": name, "M": M, "way": way, "cfg": [bm, bn, bk, splits, stages, warps], "ms": t * 1e3,
                         "GBps": L * K * N / t / 1e9}
                except Exception as e:
                    r = {"shape": name, "M": M, "way": way, "cfg": [bm, bn, bk, splits, stages, warps], "error": repr(e)[:200]}
                out.append(r); print(json.dumps(r), flush=True)
    x = jax.random.normal(key, (8, K), jnp.float32).astype(jnp.bfloat16)
    refu = jnp.dot(x.astype(jnp.float32), qnk[3].astype(jnp.float32).T)
    gotu = gemm(x, qnk, jnp.int32(3), bm=16, bn=64, bk=256, splits=4, stages=3, warps=4, fp8x=False)
    x8, sx = qrows(x)
    got = gemm(x8, qnk, jnp.int32(3), bm=16, bn=64, bk=256, splits=4, stages=3, warps=4, fp8x=True) * sx
    print(name, "upcast rel err", float(jnp.max(jnp.abs(gotu - refu)) / jnp.max(jnp.abs(refu))),
          "f8f8 vs exact", float(jnp.max(jnp.abs(got - refu)) / jnp.max(jnp.abs(refu))), flush=True)
    del qnk
json.dump(out, open(f"{odir}/fp8_probe3.json", "w"), indent=1)
best = {}
for r in out:
    if "ms" in r:
        k = (r["shape"], r["M"], r["way"])
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
for k, r in sorted(best.items()):
    print(k, f"{r['ms']:.3f} ms {r['GBps']:.0f} GB/s", r.get("cfg", ""))
