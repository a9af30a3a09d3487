"""fp8 gemm forms that read no copied weights: cuBLASLt fp8 on per-layer buffers (Python-unrolled
layers), and Pallas kernels on the stacked weight in [L, N, K] layout (fp8 x fp8, and upcast)."""
import functools, json, os, time
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

def nk_kernel(layer_ref, x_ref, q_ref, o_ref, *, n_dim, bn, bk, steps, fp8x):
    n0 = pl.program_id(1) * bn
    split = pl.program_id(2)
    k_start = split * steps * bk
    row0 = layer_ref[0] * n_dim + n0
    def body(i, acc):
        k0 = pl.multiple_of(k_start + i * bk, bk)
        x = x_ref[:, pl.ds(k0, bk)]
        w = q_ref[pl.ds(row0, bn), pl.ds(k0, bk)]  # [bn, bk] K-contiguous
        if not fp8x:
            w = w.astype(x.dtype)
        return acc + jnp.dot(x, w.T, preferred_element_type=jnp.float32)
    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((x_ref.shape[0], bn), jnp.float32))

def nk_gemm(x, q, layer, *, bm, bn, bk, splits, stages, warps, fp8x):
    M, K = x.shape
    Lq, N, _ = q.shape
    mb = -(-M // bm)
    xp = jnp.pad(x, ((0, mb * bm - M), (0, 0)))
    steps = K // (bk * splits)
    o = pl.pallas_call(
        functools.partial(nk_kernel, n_dim=N, bn=bn, bk=bk, steps=steps, fp8x=fp8x),
        grid=(mb, N // bn, splits),
        in_specs=[pl.BlockSpec((1,), lambda i, j, s: (0,)), pl.BlockSpec((bm, K), lambda i, j, s: (i, 0)),
                  pl.BlockSpec((Lq * N, K), lambda i, j, s: (0, 0))],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mb * bm, N), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
    )(layer.reshape(1), xp, q.reshape(Lq * N, K))
    return o.sum(0)[:M]

def splits_for(M, N, K, bm, bn, bk):
    p = -(-M // bm) * (N // bn); s = 1
    while p * s < 264 and s < 16 and K % (bk * s * 2) == 0 and K // (bk * s * 2) >= 2:
        s *= 2
    return s

key = jax.random.key(0)
for name, (K, N) in SHAPES.items():
    qnk = (jax.random.normal(key, (L, N, K), jnp.float32) * 8).astype(FP8)
    layers = [qnk[l] for l in range(L)]  # separate buffers
    jax.block_until_ready(layers)
    for M in (1, 8, 64, 256):
        x = jax.random.normal(key, (M, K), jnp.float32).astype(jnp.bfloat16)
        # 1. cuBLASLt fp8, per-layer buffers, unrolled
        def unrolled(x, *ws):
            acc = jnp.float32(0)
            for w in ws:
                xr = jnp.pad(x, ((0, max(0, 16 - x.shape[0])), (0, 0)))
                x8, sx = qrows(xr)
                y = lax.dot_general(x8, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * sx
                acc = acc + y[:M, :8].sum()
            return acc
        try:
            t0 = time.perf_counter()
            c = jax.jit(unrolled).lower(x, *layers).compile(compiler_options=OPTS)
            ct = time.perf_counter() - t0
            txt = c.as_text()
            t = timed(c, x, *layers)
            r = {"shape": name, "M": M, "way": "cublaslt_f8_unrolled", "ms": t * 1e3, "GBps": L * K * N / t / 1e9,
                 "compile_s": ct, "f8_calls": txt.count("__cublas$lt$matmul$f8"), "copies": txt.count("copy")}
        except Exception as e:
            r = {"shape": name, "M": M, "way": "cublaslt_f8_unrolled", "error": repr(e)[:300]}
        out.append(r); print(json.dumps(r), flush=True)
        # 2./3. Pallas on [L, N, K]
        for fp8x in (True, False):
            bm = min(64, max(16, 1 << (M - 1).bit_length()))
            for bn, bk, stages, warps in ((64, 256, 3, 4), (128, 128, 3, 4), (32, 512, 3, 4)):
                splits = splits_for(M, N, K, bm, bn, bk)
                def scanned(x, q):
                    def body(acc, l):
                        if fp8x:
                            x8, sx = qrows(x)
                            y = nk_gemm(x8, q, l, bm=bm, bn=bn, bk=bk, splits=splits, stages=stages, warps=warps, fp8x=True) * sx
                        else:
                            y = nk_gemm(x, q, l, bm=bm, bn=bn, bk=bk, splits=splits, stages=stages, warps=warps, fp8x=False)
                        return acc + y[:, :8].sum(), None
                    return lax.scan(body, jnp.float32(0), jnp.arange(L))[0]
                way = f"pallas_{'f8f8' if fp8x else 'upcast'}_nk"
                try:
                    c = jax.jit(scanned).lower(x, qnk).compile(compiler_options=OPTS)
                    t = timed(c, x, qnk)
                    r = {"shape": name, "M": M, "way": way, "cfg": [bm, bn, bk, splits, stages, warps], "ms": t * 1e3,
                         "GBps": L * K * N / t / 1e9}
                except Exception as e:
                    r = {"shape": name, "M": M, "way": way, "cfg": [bm, bn, bk, splits, stages, warps], "error": repr(e)[:200]}
                out.append(r); print(json.dumps(r), flush=True)
    # correctness of the f8f8 kernel at layer 3, M=8
    x = jax.random.normal(key, (8, K), jnp.float32).astype(jnp.bfloat16)
    x8, sx = qrows(x)
    ref = lax.dot_general(x8.astype(jnp.float32), qnk[3].astype(jnp.float32), (((1,), (1,)), ((), ()))) * sx
    got = nk_gemm(x8, qnk, jnp.int32(3), bm=16, bn=64, bk=256, splits=4, stages=3, warps=4, fp8x=True) * sx
    refu = jnp.dot(x.astype(jnp.float32), qnk[3].astype(jnp.float32).T)
    gotu = nk_gemm(x, qnk, jnp.int32(3), bm=16, bn=64, bk=256, splits=4, stages=3, warps=4, fp8x=False)
    print(name, "f8f8 rel err", float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))),
          "upcast rel err", float(jnp.max(jnp.abs(gotu - refu)) / jnp.max(jnp.abs(refu))),
          "a8 quantization rel err", float(jnp.max(jnp.abs(ref - refu)) / jnp.max(jnp.abs(refu))), flush=True)
    del qnk, layers
json.dump(out, open(f"{odir}/fp8_probe2.json", "w"), indent=1)
best = {}
for r in out:
    if "ms" in r:
        k = (r["shape"], r["M"], r["way"])
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
for k, r in sorted(best.items()):
    print(k, f"{r['ms']:.3f} ms {r['GBps']:.0f} GB/s", r.get("cfg", ""), r.get("compile_s", ""))
