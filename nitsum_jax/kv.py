"""The paged KV cache: device arrays, sizes, and (re-exported from `pages`) the host allocator.

Page tables mean the same thing on every lane, so only they are uploaded per step; the
device arrays themselves (`KVCache`) are allocated once and updated in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nitsum_jax.attention import KVCache
from nitsum_jax.config import LlamaConfig
from nitsum_jax.pages import OutOfPages, PageAllocator

__all__ = ["OutOfPages", "PageAllocator", "allocate_kv_cache", "kv_bytes_per_page", "kv_cache_shape"]


def kv_cache_shape(cfg: LlamaConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)


def kv_bytes_per_page(cfg: LlamaConfig, page_size: int) -> int:
    """K and V bytes of one page over all layers and kv heads."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(cfg.jnp_dtype).itemsize


def allocate_kv_cache(cfg: LlamaConfig, num_pages: int, page_size: int,
                      sharding: jax.sharding.Sharding | None = None, slots: int = 1) -> KVCache:
    """Zeroed pages; with `slots` > 1 each slot holds kv_heads / slots heads (see ChunkLayout)."""
    layers, heads, pages, size, head_dim = kv_cache_shape(cfg, num_pages, page_size)
    shape = (layers, max(heads, slots) // slots, pages, size, head_dim)

    def zeros():
        return KVCache(k=tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(slots)),
                       v=tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(slots)))

    if sharding is None:
        return jax.jit(zeros)()
    return jax.jit(zeros, out_shardings=KVCache(k=(sharding,) * slots, v=(sharding,) * slots))()
