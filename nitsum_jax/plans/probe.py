"""Measuring a plan set's KV moves: random contents, a checksum of a sequence's pages, and the
median time of moving one sequence between two lanes with its contents checked.

Used by the engine's switch-cost probe (`Engine.measure_switch_costs`, which `nitsum-jax bench`
runs after each measured run) and by the GPU scripts under bench/.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def fill_random(lane, seed: int) -> None:
    """Random KV contents in every page of `lane` (never time or check moves on zeros). Only for a
    lane that holds no live sequence: every page is overwritten."""
    def rnd(kv):  # the old cache is donated: a lane's cache may not fit twice
        keys = jax.random.split(jax.random.key(seed), 2)
        return type(kv)(k=jax.random.normal(keys[0], kv.k.shape, kv.k.dtype),
                        v=jax.random.normal(keys[1], kv.v.shape, kv.v.dtype))
    with lane.kv_lock:
        lane.kv = jax.jit(rnd, out_shardings=jax.tree.map(lambda a: a.sharding, lane.kv), donate_argnums=0,
                          keep_unused=True)(lane.kv)


def kv_checksum(lane, pages: list[int]) -> float:
    """Sum of squares of the K and V values in `pages` of `lane` (float32)."""
    k, v, _ = lane.gather_pages(pages)
    n = len(pages)
    return float(sum(jnp.sum(a[:, :, :n].astype(jnp.float32) ** 2) for a in k + v))


def measure_move(plan_set, src, dst, tokens: int, repeats: int = 5) -> dict:
    """Move a `tokens`-token sequence src -> dst and back, `repeats` times after two warm-ups, each
    move waited for; the median of the src -> dst moves. Both lanes must have the pages free.
    Returns {"tokens", "MB" (the sequence's K and V bytes), "ms", "GB_per_s", "contents_equal"}."""
    seq = ("probe-move", src.name, dst.name)
    src.allocator.reserve(seq, tokens)
    try:
        pages, nbytes = len(src.allocator.pages(seq)), src.kv_bytes(seq)
        before = kv_checksum(src, src.allocator.pages(seq))
        times, holder = [], src
        for i in range(2 * (repeats + 2)):
            a, b = (src, dst) if i % 2 == 0 else (dst, src)
            jax.block_until_ready(a.kv)
            t0 = time.perf_counter()
            plan_set.move(seq, a, b)
            jax.block_until_ready(b.kv)
            if i >= 4 and a is src:
                times.append(time.perf_counter() - t0)
            holder = b
        after = kv_checksum(holder, holder.allocator.pages(seq))
    finally:
        for lane in (src, dst):
            if seq in lane.allocator:
                lane.allocator.free(seq)
    seconds = statistics.median(times)
    return {"tokens": pages * src.page_size, "MB": nbytes / 1e6, "ms": seconds * 1e3, "GB_per_s": nbytes / seconds / 1e9,
            "contents_equal": abs(before - after) <= 1e-6 * abs(before) and before > 0}
