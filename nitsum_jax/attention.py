"""Paged attention, plain JAX: the reference every faster kernel must match. Runs on CPU.

Cache layout per layer: K and V are [kv_heads, num_pages, page_size, head_dim] (the layout of
`jax.experimental.pallas.ops.gpu.paged_attention`), stacked over layers into
[layers, kv_heads, num_pages, page_size, head_dim] so the layer loop updates them in place, and
over a lane's chunk positions into one array [positions, layers, kv_heads, ...]: position r holds
the kv heads of the chunk in that position on each device (`model.ChunkLayout`), contiguous, so a
KV move reads or writes one position as one block.
Page tables map a sequence's logical page i to a physical page id; they are built on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """One K and one V array for the lane: [R, layers, tp x kv heads per chunk, num_pages,
    page_size, head_dim], R chunk positions per device (1 when unsplit), sharded over `tp` on
    the kv-head axis. `k[r]` is position r's [layers, kv_heads, num_pages, page_size, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[3]

    @property
    def page_size(self) -> int:
        return self.k.shape[4]


def write_kv_pages(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, k: jax.Array, v: jax.Array,
                   positions: jax.Array, valid: jax.Array, page_table: jax.Array):
    """Scatter new K/V into their pages.

    k_cache, v_cache: [R, layers, K, P, S, H]; layer: scalar; k, v: [B, T, R, K, H];
    positions: [B, T] absolute positions; valid: [B, T]; page_table: [B, pages_per_seq].
    Padding tokens get an out-of-range page id and are dropped by the scatter.
    """
    num_pages, page_size = k_cache.shape[3], k_cache.shape[4]
    logical_page = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
    page = jnp.take_along_axis(page_table, logical_page, axis=1)  # [B, T]
    page = jnp.where(valid, page, num_pages)
    slot = positions % page_size
    # Indices (:, layer, :, page, slot): the advanced indices are split by slices, so the
    # updated elements are laid out [B, T, R, K, H] - exactly the shape of k and v.
    k_cache = k_cache.at[:, layer, :, page, slot].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[:, layer, :, page, slot].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def paged_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                              positions: jax.Array, page_table: jax.Array) -> jax.Array:
    """Causal attention of new queries over each sequence's cached pages.

    q: [B, T, R, N, H] (rotated; N query heads of each chunk position); k_cache, v_cache:
    [R, layers, K, P, S, H]; positions: [B, T]; page_table: [B, pages_per_seq]. A query at
    position p sees cache positions 0..p. Returns [B, T, R, N, H] in q's dtype.
    """
    return jnp.stack([_attend(q[:, :, r], k_cache[r], v_cache[r], layer, positions, page_table)
                      for r in range(k_cache.shape[0])], axis=2)


def _attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
            positions: jax.Array, page_table: jax.Array) -> jax.Array:
    """One chunk position: q [B, T, N, H], caches [layers, K, P, S, H] -> [B, T, N, H]."""
    B, T, N, H = q.shape
    K = k_cache.shape[1]
    G = N // K
    # Gather the sequence's pages: [B, pages_per_seq, K, S, H] -> [B, K, pages_per_seq * S, H].
    keys = k_cache[layer, :, page_table]
    values = v_cache[layer, :, page_table]
    keys = keys.transpose(0, 2, 1, 3, 4).reshape(B, K, -1, H)
    values = values.transpose(0, 2, 1, 3, 4).reshape(B, K, -1, H)
    # The products in float32 (exact for bf16 inputs, as a float32-accumulating dot would give
    # them): XLA's CPU runtime has no bf16 x bf16 -> f32 batched dot for some shapes (a bf16
    # model's batch-2 decode failed with "Unsupported element type for DotThunk").
    qg = q.reshape(B, T, K, G, H).astype(jnp.float32)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys.astype(jnp.float32))
    scores = scores / jnp.sqrt(jnp.float32(H))
    key_pos = jnp.arange(keys.shape[2])
    mask = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)  # rounded as the model dtype, as before
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs.astype(jnp.float32), values.astype(jnp.float32))
    return out.reshape(B, T, N, H).astype(q.dtype)
