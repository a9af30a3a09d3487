"""Decode attention with the new token's RoPE and KV write in the same kernel (Pallas, Triton backend).

A decode step (one new token per sequence) used to run five small kernels around the attention
kernel in every layer: RoPE on the queries fused with padding them to 16 rows, RoPE on the new
key fused with its scatter into the cache, the value's scatter, padding the row positions, and
slicing the padded rows off the output. On an H200 a Llama-3.1-8B batch-8 step spent about 0.3 ms
of its 5 ms there (BENCHMARKS.md, "Decode roofline"). This kernel takes the layer's fused q/k/v
projection as it leaves the gemm and does all of it:

- One program owns one (sequence b, kv head h of chunk position r, KV split), as in
  `paged_attention.py`. It loads the G query rows of kv head h straight from the projection
  (masked up to the 16-row dot operand, no padded copy) and the new key and value.
- RoPE (half-split rotation) from per-row tables computed once a step: out = x * cos + swap(x) *
  sin_signed, where swap(x) is x read at columns (c + H/2) mod H and sin_signed carries the sign of
  each half. The same fp32 products as `model.apply_rope`, rounded to the model dtype.
- The program of split 0 writes the rotated key and the value into their page slot (dropped
  for idle rows) and folds the new key into its online softmax from registers. Every split
  reads only cache positions below the new one, so no program reads the slot being written.
- Cache positions 0..p-1 are attended as in `paged_attention.py` (page-table gather, base-2 online
  softmax, fp32 statistics); with one split the output rows are stored in place in the layout
  the output projection reads, else the partial results are merged in plain JAX.

Semantics equal `model.apply_rope` + `attention.write_kv_pages` + `attention.paged_attention_reference`
for one new token per row (tests/test_kernels.py, interpret mode on CPU; bench/gpu_kernel.py on a GPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from nitsum_jax.kernels.paged_attention import _LOG2E, _merge_splits, _next_pow2, default_num_splits


def rope_rows(positions: jax.Array, inv_freq, head_dim: int) -> jax.Array:
    """positions [B] -> [B, 2, H] float32: cos per column, and sin with the sign of each half
    (-sin for the first half, +sin for the second), so rotate(x) = x * cos + swap(x) * sin."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]  # [B, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.stack([jnp.concatenate([cos, cos], axis=1), jnp.concatenate([-sin, sin], axis=1)], axis=1)


def _decode_kernel(layer_ref, pos_ref, valid_ref, table_ref, qkv_ref, rope_ref, k_ref, v_ref, scale_ref, *out_refs,
                   num_groups: int, num_positions: int, num_kv_heads: int, q_heads: int, num_layers: int, num_pages: int,
                   page_size: int, pages_per_seq: int, block_m: int, block_n: int, num_splits: int,
                   scale_log2: float):
    b, rk, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    C, R, K, G = num_groups, num_positions, num_kv_heads, q_heads // num_kv_heads
    X = q_heads + 2 * K
    head_dim = rope_ref.shape[1]
    # Program id 1 runs over (position r, cache kv head hh = group c x K + head h).
    r, hh = rk // (C * K), rk % (C * K)
    c, h = hh // K, hh % K
    p = pos_ref[0]
    row_scale = scale_ref[0]  # the row's 1 / rms when the norm weights are folded into the projection, else 1
    rows = jnp.arange(block_m, dtype=jnp.int32)
    live = rows < G
    cols = jnp.arange(head_dim, dtype=jnp.int32)
    swap = (cols + head_dim // 2) % head_dim
    one = jnp.zeros((1,), jnp.int32)

    # The new token: G query rows, its key and value, from the fused projection [B * C * R * X, H].
    first = ((b * C + c) * R + r) * X
    q_row = (first + h * G + jnp.minimum(rows, G - 1))[:, None]
    cos = pl_triton.load(rope_ref.at[(2 * b + one)[:, None], cols[None, :]])  # [1, H] fp32
    sin = pl_triton.load(rope_ref.at[(2 * b + 1 + one)[:, None], cols[None, :]])

    def rotated(row, mask=None):
        masked = {} if mask is None else dict(mask=mask, other=0)
        x = pl_triton.load(qkv_ref.at[row, cols[None, :]], **masked).astype(jnp.float32)
        x_swap = pl_triton.load(qkv_ref.at[row, swap[None, :]], **masked).astype(jnp.float32)
        return (x * cos + x_swap * sin) * row_scale

    q = rotated(q_row, live[:, None]).astype(qkv_ref.dtype)  # [block_m, H]
    kv_row = (first + q_heads + h + one)[:, None]
    k_new = rotated(kv_row).astype(k_ref.dtype)  # [1, H]
    v_new = (pl_triton.load(qkv_ref.at[kv_row + K, cols[None, :]]).astype(jnp.float32) * row_scale).astype(v_ref.dtype)

    # Split 0 starts from the new key (its probability is exp2(0) = 1), the others from nothing.
    first_split = split == 0
    s_new = jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32), axis=1) * scale_log2  # [block_m]
    start = first_split.astype(jnp.float32)  # arithmetic, not a scalar-predicate select (Triton)
    m = s_new * start - 1e30 * (1.0 - start)
    l = start + jnp.zeros((block_m,), jnp.float32)
    o = start * jnp.broadcast_to(v_new.astype(jnp.float32), (block_m, head_dim))

    base = ((r * num_layers + layer_ref[0]) * C * K + hh) * num_pages
    seen_keys = jnp.minimum(p, pages_per_seq * page_size)  # cache positions 0..p-1
    num_blocks = pl.cdiv(seen_keys, block_n)
    if num_splits == 1:
        lo, hi = 0, num_blocks
    else:
        per_split = pl.cdiv(num_blocks, num_splits)
        lo = split * per_split
        hi = jnp.minimum(lo + per_split, num_blocks)

    def body(j, carry):
        o, m, l = carry
        key_pos = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
        logical_page = jnp.minimum(key_pos // page_size, pages_per_seq - 1)
        page = jnp.clip(table_ref[logical_page], 0, num_pages - 1)
        at = ((base + page)[:, None], (key_pos % page_size)[:, None], cols[None, :])
        seen = key_pos < seen_keys
        k = pl_triton.load(k_ref.at[at], mask=seen[:, None], other=0)
        s = jnp.dot(q, k.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32) * scale_log2
        s = jnp.where(seen[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        prob = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(prob, axis=1)
        v = pl_triton.load(v_ref.at[at], mask=seen[:, None], other=0)
        pv = jnp.dot(prob.astype(v.dtype), v, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        return o * alpha[:, None] + pv, m_new, l

    o, m, l = lax.fori_loop(lo, hi, body, (o, m, l))

    *attn_refs, k_out, v_out = out_refs
    # The new token's K and V into their page slot, once (split 0), not for idle rows.
    logical = jnp.minimum(p // page_size, pages_per_seq - 1) + one
    page = table_ref[logical]  # [1]
    write = first_split & (valid_ref[0] != 0) & (page >= 0) & (page < num_pages)
    write = jnp.broadcast_to(write[:, None], (1, head_dim))
    slot_at = ((base + jnp.clip(page, 0, num_pages - 1))[:, None], (p % page_size + one)[:, None], cols[None, :])
    pl_triton.store(k_out.at[slot_at], k_new, mask=write)
    pl_triton.store(v_out.at[slot_at], v_new, mask=write)

    if num_splits == 1:
        (out_ref,) = attn_refs  # [B * C * R * q_heads, H], the rows the output projection reads
        # Padding rows (masked) point at the rows after the head's, wrapped: distinct addresses,
        # as interpret mode's masked store writes back what it read there.
        out_row = ((((b * C + c) * R + r) * q_heads + h * G + rows) % out_ref.shape[0])[:, None]
        pl_triton.store(out_ref.at[out_row, cols[None, :]], (o / l[:, None]).astype(out_ref.dtype),
                        mask=live[:, None])
    else:
        o_ref, m_ref, l_ref = attn_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("q_heads", "block_n", "num_splits", "num_warps", "num_stages",
                                             "interpret"))
def decode_attention_kernel(qkv: jax.Array, rope: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                            layer: jax.Array, positions: jax.Array, valid: jax.Array, page_table: jax.Array, *,
                            q_heads: int, row_scale: jax.Array | None = None, block_n: int = 64,
                            num_splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
                            interpret: bool = False):
    """One new token per row: RoPE, KV write and causal paged attention in one kernel.

    qkv: [B, C, R, X, H], the fused projection of tp group c (C = 1 on a device of a sharded
    lane) and chunk position r: `q_heads` query heads, then K key heads, then K value heads
    (X = q_heads + 2K), not yet rotated; rope: [B, 2, H] from `rope_rows`; k_cache, v_cache:
    [R, layers, C x K, P, S, H]; layer: scalar; positions: [B] the new token's position (within
    the page table, as the engine keeps it); valid: [B]
    (False: an idle row, nothing written); page_table: [B, pages_per_seq]; row_scale: [B] float32
    or None (ones): each row's q, k and v are multiplied by it first (`model.fold_norms`: the
    projection read the un-normalised stream, and this is the row's 1 / rms).
    Returns (attention [B, C, R, q_heads, H] in qkv's dtype, k_cache, v_cache), the caches updated
    in place when the caller donates them.
    block_n (keys a loop step) is 64: 128 is faster at 4096 tokens but slower at 1024 in the same
    4096-token tables, and the kernel is compiled for a table, not a context (the H200 sweep in
    bench/KERNEL_NOTES.md).
    """
    B, C, R, X, H = qkv.shape
    R_cache, L, CK, P, S, H_cache = k_cache.shape
    K = CK // C
    pages_per_seq = page_table.shape[1]
    if v_cache.shape != k_cache.shape or H_cache != H or R_cache != R:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must both be [{R}, layers, kv_heads, "
                         f"pages, page_size, {H}]")
    if CK % C or X != q_heads + 2 * K or q_heads % K:
        raise ValueError(f"qkv has {X} heads per position; expected {q_heads} query heads + 2 x {K} kv heads")
    if rope.shape != (B, 2, H):
        raise ValueError(f"rope {rope.shape}; expected {(B, 2, H)}")
    G = q_heads // K
    block_m = max(16, _next_pow2(G))
    if num_splits is None:
        num_splits = default_num_splits(B, R * CK, 1, pl.cdiv(pages_per_seq * S, block_n))
    kernel = functools.partial(
        _decode_kernel, num_groups=C, num_positions=R, num_kv_heads=K, q_heads=q_heads, num_layers=L, num_pages=P, page_size=S,
        pages_per_seq=pages_per_seq, block_m=block_m, block_n=block_n, num_splits=num_splits,
        scale_log2=_LOG2E / math.sqrt(H))
    k_flat = k_cache.reshape(R * L * CK * P, S, H)  # free reshapes (row-major)
    v_flat = v_cache.reshape(R * L * CK * P, S, H)
    whole = lambda shape: pl.BlockSpec(shape, lambda b, h, s: (0,) * len(shape))  # noqa: E731
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, s: (0,)),  # layer
        pl.BlockSpec((1,), lambda b, h, s: (b,)),  # positions
        pl.BlockSpec((1,), lambda b, h, s: (b,)),  # valid
        pl.BlockSpec((None, pages_per_seq), lambda b, h, s: (b, 0)),  # page_table
        whole((B * C * R * X, H)),  # qkv: rows gathered in-kernel
        whole((2 * B, H)),  # rope
        whole(k_flat.shape),
        whole(v_flat.shape),
        pl.BlockSpec((1,), lambda b, h, s: (b,)),  # row_scale
    ]
    RK = R * CK
    rows = B * C * R * q_heads
    out_rows = max(rows, block_m)  # room for a program's masked rows at distinct addresses
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((out_rows, H), qkv.dtype)]
        out_specs = [whole((out_rows, H))]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, RK, num_splits, block_m, H), jnp.float32),
                     jax.ShapeDtypeStruct((B, RK, num_splits, block_m), jnp.float32),
                     jax.ShapeDtypeStruct((B, RK, num_splits, block_m), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, block_m, H), lambda b, h, s: (b, h, s, 0, 0)),
                     pl.BlockSpec((None, None, None, block_m), lambda b, h, s: (b, h, s, 0)),
                     pl.BlockSpec((None, None, None, block_m), lambda b, h, s: (b, h, s, 0))]
    n_attn = len(out_shape)
    out_shape += [jax.ShapeDtypeStruct(k_flat.shape, k_flat.dtype), jax.ShapeDtypeStruct(v_flat.shape, v_flat.dtype)]
    out_specs += [whole(k_flat.shape), whole(v_flat.shape)]
    outs = pl.pallas_call(
        kernel,
        grid=(B, RK, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={6: n_attn, 7: n_attn + 1},
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"decode_attention_m{block_m}_n{block_n}_s{num_splits}",
    )(jnp.asarray(layer, jnp.int32).reshape(1), positions.astype(jnp.int32), valid.astype(jnp.int32),
      page_table.astype(jnp.int32), qkv.reshape(B * C * R * X, H), rope.astype(jnp.float32).reshape(2 * B, H),
      k_flat, v_flat, jnp.ones((B,), jnp.float32) if row_scale is None else row_scale.astype(jnp.float32))
    if num_splits == 1:
        out = outs[0][:rows].reshape(B, C, R, q_heads, H)
    else:  # [B, (r, c, k), rows, H] -> [B, c, r, k x G, H]
        merged = _merge_splits(*outs[:3])[:, :, :G].astype(qkv.dtype).reshape(B, R, C, K, G, H)
        out = merged.transpose(0, 2, 1, 3, 4, 5).reshape(B, C, R, q_heads, H)
    return out, outs[n_attn].reshape(k_cache.shape), outs[n_attn + 1].reshape(v_cache.shape)
