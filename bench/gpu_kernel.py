"""Check and time the Pallas paged-attention kernel against the plain-JAX reference on a GPU.

Run on the device machine:  PYTHONPATH=. python bench/gpu_kernel.py --out $OUT
(1) correctness at llama-3.1-8b attention shapes (N=32, K=8, H=128; per-shard K=4, K=2 for TP2 and
    TP4), fresh random bf16 data (one fp32 case), ||out - ref|| / ||ref|| with the reference run on
    fp32-upcast inputs; the kernel's output memory is poisoned with NaN first.
    Also: one launch over four chunk positions (a lane holding several chunks), the KV-move
    page copies (kernels/page_copy.py) with per-piece chunk positions, bit for bit, and the fused
    decode kernel (kernels/decode_attention.py) against RoPE + the KV write + the reference.
(2) timing, kernel vs reference: each timed call runs `calls` attention layers inside one jitted
    loop over a stacked cache of `layers` distinct layers (the cache is far larger than L2), so
    the median per layer excludes dispatch. Decode at batch 1/8/32/64 x context 512/2048/4096;
    one prefill chunk of 512 tokens over a 2048-token context; a small block/warps sweep.
Every case is caught on its own: one failure prints and the script goes on. A compact table is
printed last; everything goes to $OUT/gpu_kernel.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nitsum_jax.attention import paged_attention_reference
from nitsum_jax.kernels.paged_attention import paged_attention_kernel

HEAD_DIM, PAGE_SIZE, GROUP = 128, 16, 4  # llama-3.1-8b: N = 32 query heads, K = 8 kv heads


def make_inputs(seed, *, batch, new_tokens, kv_heads, lengths, pages_per_seq, layers, dtype):
    """Random q and a random stacked cache with exactly the pages the batch needs, shuffled so each
    sequence's pages are scattered (non-contiguous). lengths: cached tokens before the new ones."""
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    need = [min(pages_per_seq, math.ceil((n + new_tokens) / PAGE_SIZE)) for n in lengths]
    num_pages = max(sum(need), 1)
    cache_shape = (1, layers, kv_heads, num_pages, PAGE_SIZE, HEAD_DIM)  # one chunk position
    k_cache = jax.random.normal(kk, cache_shape, jnp.float32).astype(dtype)
    v_cache = jax.random.normal(kv, cache_shape, jnp.float32).astype(dtype)
    q = jax.random.normal(kq, (batch, new_tokens, 1, kv_heads * GROUP, HEAD_DIM), jnp.float32).astype(dtype)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_pages)
    table = np.zeros((batch, pages_per_seq), np.int32)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[start:start + n]
        start += n
    positions = np.asarray(lengths)[:, None] + np.arange(new_tokens)[None, :]
    return q, k_cache, v_cache, jnp.asarray(positions, jnp.int32), jnp.asarray(table)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def poison_allocator(shape, dtype):
    """Fill then free a buffer of the output's size, so an unwritten output shows up as NaN."""
    jax.block_until_ready(jnp.full(shape, jnp.nan, dtype))


def check(name, *, batch, new_tokens, kv_heads, lengths, pages_per_seq, dtype, seed):
    layers = 3
    q, k_cache, v_cache, positions, table = make_inputs(
        seed, batch=batch, new_tokens=new_tokens, kv_heads=kv_heads, lengths=lengths,
        pages_per_seq=pages_per_seq, layers=layers, dtype=dtype)
    layer = jnp.int32(layers - 1)
    poison_allocator(q.shape, q.dtype)
    out = jax.block_until_ready(paged_attention_kernel(q, k_cache, v_cache, layer, positions, table))
    finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
    f32 = [x.astype(jnp.float32) for x in (q, k_cache, v_cache)]
    ref = paged_attention_reference(*f32, layer, positions, table)
    err = rel_err(out, ref)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    return dict(case=name, dtype=jnp.dtype(dtype).name, batch=batch, new_tokens=new_tokens, kv_heads=kv_heads,
                rel_err=err, all_finite=finite, ok=finite and err < tol, tol=tol)


def check_positions(seed, *, positions=4, batch=8, kv_heads=2):
    """Attention over R chunk positions in one launch ([B, T, R, N, H] queries, [R, L, K, P, S, H]
    caches), against the reference."""
    parts = [make_inputs(seed + r, batch=batch, new_tokens=1, kv_heads=kv_heads, lengths=[700] * batch,
                         pages_per_seq=64, layers=2, dtype=jnp.bfloat16) for r in range(positions)]
    q = jnp.concatenate([p[0] for p in parts], axis=2)
    k_cache, v_cache = (jnp.concatenate([p[i] for p in parts]) for i in (1, 2))
    _, _, _, pos, table = parts[0]  # one page table: every position's pages are at the same ids
    layer = jnp.int32(1)
    out = jax.block_until_ready(paged_attention_kernel(q, k_cache, v_cache, layer, pos, table))
    f32 = [x.astype(jnp.float32) for x in (q, k_cache, v_cache)]
    err = rel_err(out, paged_attention_reference(*f32, layer, pos, table))
    finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
    return dict(case=f"decode B={batch} over {positions} positions", dtype="bfloat16", batch=batch, new_tokens=1,
                kv_heads=kv_heads, rel_err=err, all_finite=finite, ok=finite and err < 2e-2, tol=2e-2)


def check_fused_decode(seed, *, batch=8, kv_heads=8, groups=1, positions=1, dtype=jnp.bfloat16):
    """The fused decode kernel (RoPE + KV write + attention) against RoPE, `write_kv_pages` and the
    reference on fp32-upcast inputs: the output, and the caches bit for bit except the new slots
    (those within bf16 rounding), at llama-3.1-8b head shapes, ragged lengths, one idle row."""
    from nitsum_jax.attention import write_kv_pages
    from nitsum_jax.kernels.decode_attention import decode_attention_kernel, rope_rows
    from nitsum_jax.model import apply_rope

    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 2000, size=batch)
    pages_per_seq, layers = 128, 2
    q_heads, X = kv_heads * GROUP, kv_heads * (GROUP + 2)
    num_pages = batch * pages_per_seq
    shape = (positions, layers, groups * kv_heads, num_pages, PAGE_SIZE, HEAD_DIM)
    key = jax.random.split(jax.random.key(seed), 3)
    k_cache, v_cache = (jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in key[:2])
    qkv = jax.random.normal(key[2], (batch, 1, groups, positions, X, HEAD_DIM), jnp.float32).astype(dtype)
    table = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32))
    pos = jnp.asarray(lengths[:, None], jnp.int32)
    valid = jnp.asarray(np.arange(batch) < batch - 1)[:, None]
    inv_freq = (1.0 / (500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))).astype(np.float32)
    layer = jnp.int32(1)
    B = batch

    def by_position(a):
        return a.transpose(0, 1, 3, 2, 4, 5).reshape(B, 1, positions, -1, HEAD_DIM)

    q = apply_rope(by_position(qkv[..., :q_heads, :]), pos, inv_freq)
    k = apply_rope(by_position(qkv[..., q_heads:q_heads + kv_heads, :]), pos, inv_freq)
    v = by_position(qkv[..., q_heads + kv_heads:, :])
    want_k, want_v = write_kv_pages(k_cache, v_cache, layer, k, v, pos, valid, table)
    ref = paged_attention_reference(*(x.astype(jnp.float32) for x in (q, want_k, want_v)), layer, pos, table)
    ref = ref.reshape(B, 1, positions, groups, q_heads, HEAD_DIM).transpose(0, 1, 3, 2, 4, 5)[:, 0]
    out, new_k, new_v = jax.block_until_ready(decode_attention_kernel(
        qkv[:, 0], rope_rows(pos[:, 0], inv_freq, HEAD_DIM), k_cache, v_cache, layer, pos[:, 0], valid[:, 0], table,
        q_heads=q_heads))
    err = rel_err(out[:-1], ref[:-1])
    caches_ok = all(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) <= 0.05
                    and not bool(jnp.any((a != c) & (b == c)))  # nothing but the new slots moved
                    for a, b, c in ((new_k, want_k, k_cache), (new_v, want_v, v_cache)))
    finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
    return dict(case=f"fused decode B={batch} K={kv_heads} groups={groups} positions={positions}",
                dtype=jnp.dtype(dtype).name, batch=batch, new_tokens=1, kv_heads=kv_heads, rel_err=err,
                all_finite=finite, caches_ok=caches_ok, ok=finite and caches_ok and err < 2e-2, tol=2e-2)


def check_page_copies(seed, *, positions=4, layers=4, kv_heads=2, num_pages=96, n=32):
    """Gather n pages of random pieces (cache, chunk position) into one packed buffer and scatter
    its entries to other positions of a second cache: every page must arrive bit for bit, and
    nothing else may change."""
    from nitsum_jax.kernels.page_copy import gather_pages_kernel, scatter_pages_kernel

    rng = np.random.default_rng(seed)
    shape = (positions, layers, kv_heads, num_pages, PAGE_SIZE, HEAD_DIM)
    caches = tuple(jax.random.normal(jax.random.key(seed + i), shape, jnp.float32).astype(jnp.bfloat16)
                   for i in range(2))
    pages = rng.permutation(num_pages)[:n].astype(np.int32)
    kinds = tuple(int(k) for k in rng.integers(0, 2, size=2 * positions))
    src_pos = rng.integers(0, positions, size=len(kinds)).astype(np.int32)
    packed = jax.block_until_ready(gather_pages_kernel(caches, jnp.asarray(pages), jnp.asarray(src_pos), kinds=kinds))
    host = [np.asarray(c.astype(jnp.float32)) for c in caches]
    want = np.stack([host[k][r][:, :, pages] for k, r in zip(kinds, src_pos)])
    gathered_ok = bool(np.array_equal(np.asarray(packed.astype(jnp.float32)), want))
    # scatter: entry a into (cache a % 2, position perm[a // 2]) - each (cache, position) once
    perm = rng.permutation(positions).astype(np.int32)
    sources = tuple((0, a, a % 2) for a in range(2 * positions))
    dst_pos = np.repeat(perm, 2)
    dst_pages = rng.permutation(num_pages)[:n].astype(np.int32)
    base = tuple(jnp.full(shape, 3.0, jnp.bfloat16) for _ in range(2))
    out = jax.block_until_ready(scatter_pages_kernel(base, jnp.asarray(dst_pages), (packed,), jnp.asarray(dst_pos),
                                                     sources=sources))
    expect = [np.full(shape, 3.0, np.float32) for _ in range(2)]
    for a, (_, e, k) in enumerate(sources):
        expect[k][dst_pos[a]][:, :, dst_pages] = want[e]
    scattered_ok = all(np.array_equal(np.asarray(o.astype(jnp.float32)), x) for o, x in zip(out, expect))
    return dict(case=f"page copies {n} pages x {len(kinds)} pieces", dtype="bfloat16", batch=0, new_tokens=0,
                kv_heads=kv_heads, rel_err=0.0 if gathered_ok and scattered_ok else 1.0, all_finite=True,
                gathered_ok=gathered_ok, scattered_ok=scattered_ok, ok=gathered_ok and scattered_ok, tol=0.0)


def timed_loop(attention, layers, calls):
    """One jitted call runs `calls` attention layers (layer index i % layers), summing outputs so
    nothing is dead; returns a function of (q, k_cache, v_cache, positions, page_table)."""
    @jax.jit
    def run(q, k_cache, v_cache, positions, table):
        def body(i, acc):
            out = attention(q, k_cache, v_cache, i % layers, positions, table)
            return acc + out.astype(jnp.float32)
        return lax.fori_loop(0, calls, body, jnp.zeros(q.shape, jnp.float32))
    return run


def median_seconds(fn, args, iters, warmup=3):
    jax.block_until_ready(fn(*args))  # compile
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def time_case(name, *, batch, new_tokens, context, kv_heads=8, dtype=jnp.bfloat16, layers=4, calls=16,
              iters=10, kernel_cfg=None, with_reference=True, seed=0):
    """context: cache length after the new tokens. pages_per_seq = context / page size exactly: the
    reference's best case (the engine buckets pages_per_seq up to a power of two of max_seq_len)."""
    lengths = [context - new_tokens] * batch
    pages_per_seq = math.ceil(context / PAGE_SIZE)
    args = make_inputs(seed, batch=batch, new_tokens=new_tokens, kv_heads=kv_heads, lengths=lengths,
                       pages_per_seq=pages_per_seq, layers=layers, dtype=dtype)
    kv_bytes = 2 * batch * context * kv_heads * HEAD_DIM * jnp.dtype(dtype).itemsize  # K and V, one layer
    row = dict(case=name, batch=batch, new_tokens=new_tokens, context=context, kv_heads=kv_heads,
               kernel_cfg=kernel_cfg or {}, kv_bytes_per_layer=kv_bytes)
    kernel = functools.partial(paged_attention_kernel, **(kernel_cfg or {}))
    med, lo, hi = median_seconds(timed_loop(kernel, layers, calls), args, iters)
    row.update(kernel_us=1e6 * med / calls, kernel_us_min=1e6 * lo / calls, kernel_us_max=1e6 * hi / calls,
               kernel_gbps=kv_bytes / (med / calls) / 1e9)
    if with_reference:
        med, lo, hi = median_seconds(timed_loop(paged_attention_reference, layers, calls), args, iters)
        row.update(ref_us=1e6 * med / calls, ref_us_min=1e6 * lo / calls, ref_us_max=1e6 * hi / calls)
        row["speedup"] = row["ref_us"] / row["kernel_us"]
    return row


def time_fused_case(name, *, batch, context, capacity=None, kv_heads=8, layers=4, calls=16, iters=10,
                    kernel_cfg=None, seed=0):
    """The fused decode kernel (kernels/decode_attention.py) of one new token a row at `context`,
    in page tables of `capacity` tokens (default: the context): `calls` layers in one jitted loop,
    the caches carried through it (each call writes its slot)."""
    from nitsum_jax.kernels.decode_attention import decode_attention_kernel, rope_rows

    pages_per_seq = math.ceil(max(capacity or context, context) / PAGE_SIZE)
    q_heads, X = kv_heads * GROUP, kv_heads * (GROUP + 2)
    shape = (1, layers, kv_heads, batch * pages_per_seq, PAGE_SIZE, HEAD_DIM)
    key = jax.random.split(jax.random.key(seed), 3)
    k_cache, v_cache = (jax.random.normal(k, shape, jnp.bfloat16) for k in key[:2])
    qkv = jax.random.normal(key[2], (batch, 1, 1, X, HEAD_DIM), jnp.bfloat16)
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.permutation(batch * pages_per_seq).reshape(batch, pages_per_seq).astype(np.int32))
    pos = jnp.full((batch,), context - 1, jnp.int32)
    inv_freq = (1.0 / (500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))).astype(np.float32)
    rope = rope_rows(pos, inv_freq, HEAD_DIM)
    valid = jnp.ones((batch,), bool)

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def run(qkv, k_cache, v_cache):
        def body(i, carry):
            acc, k, v = carry
            out, k, v = decode_attention_kernel(qkv, rope, k, v, i % layers, pos, valid, table, q_heads=q_heads,
                                                **(kernel_cfg or {}))
            return acc + out.astype(jnp.float32), k, v
        return lax.fori_loop(0, calls, body, (jnp.zeros((batch, 1, 1, q_heads, HEAD_DIM), jnp.float32),
                                              k_cache, v_cache))

    caches = [k_cache, v_cache]

    def step():
        out, caches[0], caches[1] = run(qkv, *caches)
        return out

    jax.block_until_ready(step())
    for _ in range(3):
        jax.block_until_ready(step())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    kv_bytes = 2 * batch * context * kv_heads * HEAD_DIM * 2  # K and V of one layer, bf16
    return dict(case=name, batch=batch, new_tokens=1, context=context, capacity=pages_per_seq * PAGE_SIZE,
                kv_heads=kv_heads, kernel_cfg=kernel_cfg or {}, kv_bytes_per_layer=kv_bytes, kernel_us=1e6 * med / calls,
                kernel_us_min=1e6 * min(times) / calls, kernel_gbps=kv_bytes / (med / calls) / 1e9)


FUSED_SWEEP = ([dict(block_n=n, num_warps=w, num_stages=s) for n in (64, 128) for w in (4, 8) for s in (2, 3)]
               + [dict(num_splits=s) for s in (1, 2, 4, 8, 16)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_kernel.json")
    parser.add_argument("--quick", action="store_true", help="checks and two timings only")
    parser.add_argument("--fused-sweep", default="", help="BATCH:CONTEXT[:CAPACITY][,...]: time the fused decode "
                        "kernel at each shape (CAPACITY: tokens a page table holds, default the context) over "
                        "block_n x num_warps x num_stages and KV splits (and the default), then stop")
    parser.add_argument("--fused-configs", default="", help="with --fused-sweep: a JSON list of kernel options "
                        "to try in place of the whole sweep, e.g. '[{}, {\"num_stages\": 3}]' ({} is the default)")
    args = parser.parse_args()

    info = dict(jax=jax.__version__, python=platform.python_version(), backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()],
                device_kind=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(json.dumps(info), flush=True)
    results = dict(info=info, checks=[], timings=[], sweep=[], failures=[])
    t_start = time.time()

    def attempt(section, label, fn):
        try:
            row = fn()
            results[section].append(row)
            print(f"[{time.time() - t_start:6.1f}s] {section} {label}: "
                  + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in row.items() if k not in ("kernel_cfg",)), flush=True)
        except Exception as e:  # one failing case must not end the run
            results["failures"].append(dict(section=section, case=label, error=f"{type(e).__name__}: {e}",
                                            trace=traceback.format_exc()[-4000:]))
            print(f"[{time.time() - t_start:6.1f}s] FAILED {section} {label}: {type(e).__name__}: "
                  f"{str(e)[:1500]}", flush=True)

    if args.fused_sweep:
        for shape in args.fused_sweep.split(","):
            batch, context, capacity = ([int(x) for x in shape.split(":")] + [None])[:3]
            name = f"fused B={batch} ctx={context}" + (f" cap={capacity}" if capacity else "")
            for cfg in json.loads(args.fused_configs) if args.fused_configs else [{}] + FUSED_SWEEP:
                attempt("sweep", f"{name} {cfg}", lambda batch=batch, context=context, capacity=capacity, cfg=cfg, name=name:
                        time_fused_case(name, batch=batch, context=context, capacity=capacity, kernel_cfg=cfg,
                                        calls=32, iters=20))
        with open(f"{args.out}/gpu_kernel_fused_sweep.json", "w") as f:
            json.dump(results, f, indent=1)
        for r in results["sweep"]:
            print(f"{r['case']:<35}{json.dumps(r['kernel_cfg']):<50}{r['kernel_us']:>9.1f}{r['kernel_gbps']:>8.0f}")
        return 0 if not results["failures"] else 1

    rng = np.random.default_rng(1)
    # (1) correctness: ragged lengths (partial pages), tables longer than needed, several shards.
    for kv_heads, tp in ((8, 1), (4, 2), (2, 4)):
        lengths = rng.integers(1, 2048, size=8).tolist()
        attempt("checks", f"decode_tp{tp}", lambda kv_heads=kv_heads, tp=tp, lengths=lengths: check(
            f"decode B=8 tp{tp}", batch=8, new_tokens=1, kv_heads=kv_heads, lengths=lengths, pages_per_seq=256,
            dtype=jnp.bfloat16, seed=10 + tp))
        attempt("checks", f"prefill_tp{tp}", lambda kv_heads=kv_heads, tp=tp: check(
            f"prefill T=512 over 1536 tp{tp}", batch=1, new_tokens=512, kv_heads=kv_heads, lengths=[1536],
            pages_per_seq=160, dtype=jnp.bfloat16, seed=20 + tp))
    attempt("checks", "decode_b1_tp1", lambda: check(
        "decode B=1 tp1 (kv splits)", batch=1, new_tokens=1, kv_heads=8, lengths=[3999], pages_per_seq=256,
        dtype=jnp.bfloat16, seed=30))
    attempt("checks", "decode_fp32", lambda: check(
        "decode B=4 tp1 fp32", batch=4, new_tokens=1, kv_heads=8, lengths=[5, 700, 1500, 33], pages_per_seq=128,
        dtype=jnp.float32, seed=31))
    attempt("checks", "prefill_fp32", lambda: check(
        "prefill T=64 over 300 tp2 fp32", batch=2, new_tokens=64, kv_heads=4, lengths=[300, 17],
        pages_per_seq=32, dtype=jnp.float32, seed=32))
    attempt("checks", "positions", lambda: check_positions(40))
    attempt("checks", "page_copies", lambda: check_page_copies(41))
    attempt("checks", "fused_decode", lambda: check_fused_decode(42))
    attempt("checks", "fused_decode_b1", lambda: check_fused_decode(43, batch=2))
    attempt("checks", "fused_decode_positions", lambda: check_fused_decode(44, kv_heads=2, positions=4))
    attempt("checks", "fused_decode_groups", lambda: check_fused_decode(45, kv_heads=4, groups=2))

    # (2) timing.
    batches, contexts = ((1, 64), (2048,)) if args.quick else ((1, 8, 32, 64), (512, 2048, 4096))
    for context in contexts:
        for batch in batches:
            attempt("timings", f"decode B={batch} ctx={context}", lambda batch=batch, context=context: time_case(
                f"decode B={batch} ctx={context}", batch=batch, new_tokens=1, context=context))
    for batch, context in ((1, 2048), (64, 2048)):
        attempt("timings", f"fused decode B={batch} ctx={context}", lambda batch=batch, context=context:
                time_fused_case(f"fused B={batch} ctx={context}", batch=batch, context=context))
    attempt("timings", "prefill T=512 ctx=2048", lambda: time_case(
        "prefill T=512 ctx=2048", batch=1, new_tokens=512, context=2048, calls=8, iters=10))
    if not args.quick and time.time() - t_start > 150:
        print("skipping the sweep: past 150 s", flush=True)
    elif not args.quick:
        for cfg in (dict(block_n=32), dict(block_n=128), dict(num_warps=8), dict(num_stages=3),
                    dict(block_n=128, num_warps=8)):
            attempt("sweep", f"decode B=64 ctx=2048 {cfg}", lambda cfg=cfg: time_case(
                "decode B=64 ctx=2048", batch=64, new_tokens=1, context=2048, kernel_cfg=cfg,
                with_reference=False))
            attempt("sweep", f"decode B=1 ctx=4096 {cfg}", lambda cfg=cfg: time_case(
                "decode B=1 ctx=4096", batch=1, new_tokens=1, context=4096, kernel_cfg=cfg,
                with_reference=False))
        for cfg in (dict(block_m=128, num_warps=8), dict(block_n=128)):
            attempt("sweep", f"prefill {cfg}", lambda cfg=cfg: time_case(
                "prefill T=512 ctx=2048", batch=1, new_tokens=512, context=2048, calls=8, iters=10,
                kernel_cfg=cfg, with_reference=False))

    results["wall_s"] = time.time() - t_start
    with open(f"{args.out}/gpu_kernel.json", "w") as f:
        json.dump(results, f, indent=1)

    print("\n== checks (rel err vs fp32 reference) ==")
    for r in results["checks"]:
        print(f"{r['case']:<34} {r['dtype']:<9} err={r['rel_err']:.2e} finite={r['all_finite']} "
              f"{'OK' if r['ok'] else 'BAD'}")
    print("\n== per-layer time, median (us); GB/s = KV bytes needed / kernel time ==")
    print(f"{'case':<26}{'kernel':>9}{'ref':>9}{'speedup':>9}{'GB/s':>8}")
    for r in results["timings"]:
        print(f"{r['case']:<26}{r['kernel_us']:>9.1f}{r.get('ref_us', float('nan')):>9.1f}"
              f"{r.get('speedup', float('nan')):>9.2f}{r['kernel_gbps']:>8.0f}")
    if results["sweep"]:
        print("\n== sweep (kernel only) ==")
        for r in results["sweep"]:
            print(f"{r['case']:<35}{json.dumps(r['kernel_cfg']):<34}{r['kernel_us']:>9.1f}{r['kernel_gbps']:>8.0f}")
    print(f"\nfailures: {len(results['failures'])}; wall {results['wall_s']:.0f}s")
    for fl in results["failures"]:
        print(f"  {fl['section']} {fl['case']}: {fl['error'][:300]}")
    return 0 if not results["failures"] and all(r["ok"] for r in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
