"""Paged attention as a Pallas kernel for NVIDIA GPUs (Triton backend); `dispatch` picks it.

Same signature and semantics as `nitsum_jax.attention.paged_attention_reference`: queries
[B, T, N, H] attend causally (a query at position p sees cache positions 0..p) over the pages of
their sequence in a stacked cache [layers, K, P, S, H], with `layer` a traced scalar so that the
model's `lax.scan` passes the whole cache, never a per-layer copy. One kernel covers decode
(T == 1) and prefill / chunked prefill (T > 1).

How it works
- One program owns one (sequence b, kv head h, block of query rows, KV split). Its query rows
  are the T * G (token, query head) pairs of kv head h, token-major: the G query heads sharing
  a KV head are attended together (GQA), and decode's G rows are padded up to 16, the smallest
  Triton dot operand.
- The program loops over blocks of `block_n` consecutive cache positions up to the largest
  position among its rows, and no further: pages a sequence does not use yet are never read
  (the reference gathers all `pages_per_seq` pages). Per block it gathers the page ids from the
  page table, then K and V rows by (layer * K + h) * P + page, slot; softmax is online
  (flash-style, base 2) with fp32 statistics and an fp32 accumulator.
- When (B, K, query blocks) gives too few programs to fill the GPU (small-batch decode, TP
  shards with few kv heads), the KV range of each program is split `num_splits` ways
  (flash-decoding) and the partial results are merged in plain JAX.

Why the Pallas Triton backend, not Mosaic GPU, and not JAX's own op
- JAX marked its Pallas-Triton ops (`jax.experimental.pallas.ops.gpu`, including
  `paged_attention`) for removal, and that op takes one unstacked cache per layer and a length
  per sequence (decode only), so it fits neither the stacked cache nor chunked prefill: we keep
  our own kernel. It is not imported here.
- A paged read is a gather: Triton loads through a tensor of pointers, which a page table
  expresses directly, and the same `pallas_call` runs in interpret mode on CPU for the tests.
  Mosaic GPU wants TMA-shaped tiles and warpgroup code; its Pallas API is documented as
  unstable week to week and `pallas_call` for it is already deprecated in favour of
  `plgpu.kernel`, which makes one source for jax 0.10.2 (CI) and 0.11.x (device) harder.
- The Triton backend itself is deprecated as of jax 0.11.0 (still shipped in 0.11.x). JAX's
  default GPU lowering is Mosaic GPU, so the kernel selects Triton explicitly by passing
  `pallas.triton.CompilerParams`. A Mosaic GPU port (one TMA copy per [S, H] page) is the way
  forward once Triton goes; see bench/KERNEL_NOTES.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

# Programs wanted in flight at once: about two per SM of an H100 (132 SMs).
_TARGET_PROGRAMS = 256
_MAX_SPLITS = 16
_LOG2E = math.log2(math.e)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _attention_kernel(layer_ref, row_pos_ref, page_table_ref, q_ref, k_ref, v_ref, *out_refs,
                      num_kv_heads: int, num_layers: int, num_pages: int, page_size: int, pages_per_seq: int,
                      block_n: int, num_splits: int, scale_log2: float):
    """One program: rows of one (sequence, kv head, query block) against one KV split.

    layer_ref: [1]; row_pos_ref: [block_m] positions of the rows (-1 for padding rows);
    page_table_ref: [pages_per_seq]; q_ref: [block_m, H]; k_ref, v_ref: [R * layers * K * P, S, H]
    (program id 1 runs over the R x K kv heads of every chunk position).
    Outputs: [block_m, H] normalised (one split), else unnormalised o [block_m, H] and the
    base-2 running max m [block_m] and sum l [block_m] for the merge.
    """
    kv_head = pl.program_id(1)
    block_m, head_dim = q_ref.shape
    q = q_ref[...]  # [block_m, H]
    row_pos = row_pos_ref[...]  # [block_m]
    # Physical row of page 0 of (position, layer, kv head) in the flattened [R * layers * K * P] page axis.
    position, head = kv_head // num_kv_heads, kv_head % num_kv_heads
    base = ((position * num_layers + layer_ref[0]) * num_kv_heads + head) * num_pages

    # Cache positions 0..max(row_pos) are all these rows can see: the loop stops there, and
    # the loads of the last block are masked there too.
    max_pos = jnp.max(row_pos)
    num_blocks = pl.cdiv(max_pos + 1, block_n)
    if num_splits == 1:
        lo, hi = 0, num_blocks
    else:
        per_split = pl.cdiv(num_blocks, num_splits)
        lo = pl.program_id(3) * per_split
        hi = jnp.minimum(lo + per_split, num_blocks)

    def body(j, carry):
        o, m, l = carry
        key_pos = j * block_n + jnp.arange(block_n, dtype=jnp.int32)  # [block_n]
        # The last block may run past the table; those keys are masked below (position > row).
        logical_page = jnp.minimum(key_pos // page_size, pages_per_seq - 1)
        page = jnp.clip(page_table_ref[logical_page], 0, num_pages - 1)  # [block_n]
        row = base + page
        slot = key_pos % page_size
        # Every index an integer array (interpret mode has no masked gather with a slice in it).
        at = (row[:, None], slot[:, None], jnp.arange(head_dim, dtype=jnp.int32)[None, :])
        seen = (key_pos <= max_pos)[:, None]  # [block_n, 1]
        k = pl_triton.load(k_ref.at[at], mask=seen, other=0)  # [block_n, H]
        s = jnp.dot(q, k.T, precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32) * scale_log2  # [block_m, block_n]
        s = jnp.where(key_pos[None, :] <= row_pos[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: m starts finite
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        v = pl_triton.load(v_ref.at[at], mask=seen, other=0)  # [block_n, H]
        pv = jnp.dot(p.astype(v.dtype), v, precision=lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
        return o * alpha[:, None] + pv, m_new, l

    o = jnp.zeros((block_m, head_dim), jnp.float32)
    m = jnp.full((block_m,), -1e30, jnp.float32)
    l = jnp.zeros((block_m,), jnp.float32)
    o, m, l = lax.fori_loop(lo, hi, body, (o, m, l))

    if num_splits == 1:
        (out_ref,) = out_refs
        # Rows that saw no key (padding rows) have l == 0: write zeros, not NaN.
        out_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(out_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def default_num_splits(batch: int, num_kv_heads: int, query_blocks: int, max_kv_blocks: int) -> int:
    """Smallest power of two of KV splits that fills the GPU, each split at least 2 blocks long."""
    splits = 1
    programs = batch * num_kv_heads * query_blocks
    while (programs * splits < _TARGET_PROGRAMS and splits < _MAX_SPLITS
           and 2 * splits * 2 <= max_kv_blocks):
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "num_splits", "num_warps", "num_stages",
                                             "interpret"))
def paged_attention_kernel(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                           positions: jax.Array, page_table: jax.Array, *, block_m: int | None = None,
                           block_n: int = 64, num_splits: int | None = None, num_warps: int = 4,
                           num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Causal paged attention of new queries over their sequences' cached pages (Pallas kernel).

    q: [B, T, R, N, H] (rotated, N query heads per chunk position); k_cache, v_cache:
    [R, layers, K, P, S, H]; layer: scalar;
    positions: [B, T] absolute positions; page_table: [B, pages_per_seq] physical page ids.
    Returns q's shape and dtype. The R x K kv heads run in one launch. `block_m` query rows and `block_n` cache positions per
    step (powers of two, >= 16); `num_splits` KV splits per program (None: chosen from shapes).
    """
    B, T, R, N, H = q.shape
    R_cache, L, K, P, S, H_cache = k_cache.shape
    pages_per_seq = page_table.shape[1]
    if v_cache.shape != k_cache.shape or H_cache != H or R_cache != R:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must both be "
                         f"[{R}, layers, kv_heads, pages, page_size, {H}]")
    if N % K:
        raise ValueError(f"query heads {N} must be a multiple of kv heads {K}")
    if not _is_pow2(H) or H < 16:
        raise ValueError(f"head_dim {H} must be a power of two >= 16 for the Triton kernel")
    G = N // K
    rows = T * G
    if block_m is None:
        block_m = min(max(16, _next_pow2(rows)), 64)
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if not _is_pow2(size) or size < 16:
            raise ValueError(f"{name}={size} must be a power of two >= 16")
    query_blocks = pl.cdiv(rows, block_m)
    rows_padded = query_blocks * block_m
    if num_splits is None:
        num_splits = default_num_splits(B, R * K, query_blocks, pl.cdiv(pages_per_seq * S, block_n))

    # [B, T, R x K, G, H] -> [B, R x K, T * G, H]: the G query heads of a kv head, token-major.
    q_rows = q.reshape(B, T, R * K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, R * K, rows, H)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_padded - rows), (0, 0)))
    # Positions past the table see the whole table (as in the reference); padding rows see none.
    row_pos = jnp.minimum(positions.astype(jnp.int32), pages_per_seq * S - 1)
    row_pos = jnp.pad(jnp.repeat(row_pos, G, axis=1), ((0, 0), (0, rows_padded - rows)), constant_values=-1)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    # A free reshape (row-major): page p of (position r, layer l, kv head h) is row ((r * L + l) * K + h) * P + p.
    k_flat = k_cache.reshape(R * L * K * P, S, H)
    v_flat = v_cache.reshape(R * L * K * P, S, H)

    kernel = functools.partial(
        _attention_kernel, num_kv_heads=K, num_layers=L, num_pages=P, page_size=S, pages_per_seq=pages_per_seq,
        block_n=block_n, num_splits=num_splits, scale_log2=_LOG2E / math.sqrt(H))
    K = R * K  # the kernel's grid and outputs run over every position's kv heads
    grid = (B, K, query_blocks, num_splits)
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, i, s: (0,)),  # layer
        pl.BlockSpec((None, block_m), lambda b, h, i, s: (b, i)),  # row_pos
        pl.BlockSpec((None, pages_per_seq), lambda b, h, i, s: (b, 0)),  # page_table
        pl.BlockSpec((None, None, block_m, H), lambda b, h, i, s: (b, h, i, 0)),  # q_rows
        pl.BlockSpec(k_flat.shape, lambda b, h, i, s: (0, 0, 0)),  # whole cache: gathered in-kernel
        pl.BlockSpec(v_flat.shape, lambda b, h, i, s: (0, 0, 0)),
    ]
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((B, K, rows_padded, H), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, block_m, H), lambda b, h, i, s: (b, h, i, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, K, num_splits, rows_padded, H), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, num_splits, rows_padded), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, num_splits, rows_padded), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, block_m, H), lambda b, h, i, s: (b, h, s, i, 0)),
                     pl.BlockSpec((None, None, None, block_m), lambda b, h, i, s: (b, h, s, i)),
                     pl.BlockSpec((None, None, None, block_m), lambda b, h, i, s: (b, h, s, i))]
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"paged_attention_m{block_m}_n{block_n}_s{num_splits}",
    )(layer, row_pos, page_table.astype(jnp.int32), q_rows, k_flat, v_flat)

    if num_splits == 1:
        out = outs[0]
    else:
        out = _merge_splits(*outs).astype(q.dtype)
    out = out[:, :, :rows].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, T, R, N, H)


def _merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """o: [B, K, splits, rows, H]; m, l: [B, K, splits, rows] (base 2) -> [B, K, rows, H] fp32."""
    m_max = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp2(m - m_max)  # empty splits: m = -1e30, weight 0 beside any real split
    denom = jnp.sum(weight * l, axis=2)
    num = jnp.sum(weight[..., None] * o, axis=2)
    return num / jnp.where(denom > 0, denom, 1.0)[..., None]
