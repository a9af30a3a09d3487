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


def allocate_kv_cache(cfg: LlamaConfig, num_pages: int, page_size: int) -> KVCache:
    """Zeroed pages of the unsplit model on the default device (lanes build their own, sharded)."""
    shape = (1,) + kv_cache_shape(cfg, num_pages, page_size)  # one chunk position
    return jax.jit(lambda: KVCache(k=jnp.zeros(shape, cfg.jnp_dtype), v=jnp.zeros(shape, cfg.jnp_dtype)))()
