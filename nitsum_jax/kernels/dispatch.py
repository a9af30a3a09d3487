"""Which paged-attention implementation a step runs, and how the kernel meets tensor parallelism.

Lanes jit their steps with shardings (GSPMD / Shardy), not `shard_map`; an opaque kernel call
would make the partitioner gather the whole KV cache onto every device. `custom_partitioning`
tells it the kernel is independent per kv head: each device runs it on its own kv heads and
their query heads (N = K * G, head n belongs to kv head n // G, so the model's contiguous split
of N over `tp` lines up with the split of K); everything else is replicated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from nitsum_jax.attention import paged_attention_reference
from nitsum_jax.kernels.decode_attention import decode_attention_kernel
from nitsum_jax.kernels.paged_attention import paged_attention_kernel

IMPLS = ("auto", "kernel", "paged", "interpret", "reference")


def resolve(impl: str) -> str:
    """"auto" -> "kernel" on a GPU backend, "reference" otherwise; anything else as given (checked)."""
    if impl == "auto":
        return "kernel" if jax.default_backend() == "gpu" else "reference"
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {IMPLS}")
    return impl


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                    positions: jax.Array, page_table: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Paged attention with the reference's signature; `impl` picks the implementation.

    q: [B, T, R, N, H]; k_cache, v_cache: [R, layers, K, P, S, H] (R chunk positions); layer:
    scalar; positions: [B, T]; page_table: [B, pages_per_seq]. Returns [B, T, R, N, H].
    "auto": the Pallas kernel when the default backend is a GPU, the plain-JAX reference
    otherwise (CPU CI); "kernel": the Pallas kernel; "interpret": the kernel in Pallas interpret
    mode (any backend, slow: for tests); "reference": `paged_attention_reference`.
    Chosen while tracing from static facts only, so it never adds a compilation.
    """
    impl = resolve(impl)
    if impl == "reference":
        return paged_attention_reference(q, k_cache, v_cache, layer, positions, page_table)
    impl = "kernel" if impl == "paged" else impl  # "paged" differs from "kernel" only in decode (`model.forward`)
    B, T, R, N, H = q.shape
    K = k_cache.shape[2]
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    # Query heads grouped by kv head, so the partitioning rule needs no compound (k g) factor.
    q_grouped = q.reshape(B, T, R, K, N // K, H)
    out = _partitioned_kernel(q_grouped, layer, k_cache, v_cache, positions, page_table, impl == "interpret")
    return out.reshape(B, T, R, N, H)


def _kernel_on_shard(q_grouped, layer, k_cache, v_cache, positions, page_table, interpret):
    """q_grouped: [B, T, R, K, G, H] (this shard's kv heads); layer: [1]. Returns [B, T, R, K, G, H]."""
    B, T, R, K, G, H = q_grouped.shape
    out = paged_attention_kernel(q_grouped.reshape(B, T, R, K * G, H), k_cache, v_cache, layer[0], positions,
                                 page_table, interpret=interpret)
    return out.reshape(B, T, R, K, G, H)


_partitioned_kernel = custom_partitioning(_kernel_on_shard, static_argnums=(6,))


def _kv_head_axis(k_sharding) -> str | tuple[str, ...] | None:
    spec = getattr(k_sharding, "spec", None)
    if spec is None or len(spec) < 3:
        return None
    return spec[2]


def _shardings(mesh, kv_axis):
    q = NamedSharding(mesh, PartitionSpec(None, None, None, kv_axis, None, None))
    kv = NamedSharding(mesh, PartitionSpec(None, None, kv_axis, None, None, None))
    replicated = NamedSharding(mesh, PartitionSpec())
    return q, (q, replicated, kv, kv, replicated, replicated)


def _infer(interpret, mesh, arg_shapes, result_shape):
    del interpret, result_shape
    return _shardings(mesh, _kv_head_axis(arg_shapes[2].sharding))[0]


def _partition(interpret, mesh, arg_shapes, result_shape):
    del result_shape
    out_sharding, arg_shardings = _shardings(mesh, _kv_head_axis(arg_shapes[2].sharding))
    lower_fn = functools.partial(_kernel_on_shard, interpret=interpret)
    return mesh, lower_fn, out_sharding, arg_shardings


# Factors: b batch, t new tokens, r chunk positions, k kv heads, g query heads per kv head, h head
# dim, u the one-element layer index, l layers, p pages, s page slots, x page-table columns. Only k may be
# sharded: the kernel is independent per kv head, and a query head group stays with its kv head.
_partitioned_kernel.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer,
    sharding_rule="b t r k g h, u, r l k p s h, r l k p s h, b t, b x -> b t r k g h",
    need_replication_factors=("b", "t", "r", "g", "h", "u", "l", "p", "s", "x"),
)


def decode_attention(qkv: jax.Array, rope: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                     positions: jax.Array, valid: jax.Array, page_table: jax.Array, *, q_heads: int,
                     row_scale: jax.Array | None = None, interpret: bool = False):
    """One new token per row through `decode_attention_kernel`, each device on its own kv heads.

    qkv: [B, 1, tp, R, X, H] (the layer's fused projection, `tp` the model-parallel axis);
    rope: [B, 2, H]; k_cache, v_cache: [R, layers, tp x K, P, S, H]; positions, valid: [B, 1];
    page_table: [B, pages_per_seq]; row_scale: [B] or None (`decode_attention_kernel`). Returns (attention [B, 1, tp, R, q_heads, H], k_cache, v_cache).
    The caches' kv-head axis is viewed as (tp, K) (a free reshape), so that one factor is sharded
    in every operand.
    """
    tp = qkv.shape[2]
    R, L, TK, P, S, H = k_cache.shape
    view = (R, L, tp, TK // tp, P, S, H)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    row_scale = jnp.ones((qkv.shape[0],), jnp.float32) if row_scale is None else row_scale.astype(jnp.float32)
    out, k7, v7 = _partitioned_decode(qkv, rope, layer, k_cache.reshape(view), v_cache.reshape(view), positions,
                                      valid, page_table, row_scale, q_heads, interpret)
    return out, k7.reshape(k_cache.shape), v7.reshape(v_cache.shape)


def _decode_on_shard(qkv, rope, layer, k7, v7, positions, valid, page_table, row_scale, q_heads, interpret):
    B, T, C, R, X, H = qkv.shape  # T == 1; C: this shard's share of the tp axis (1 under tp sharding)
    R, L, C, K, P, S, H = k7.shape
    kv = (R, L, C * K, P, S, H)
    out, k, v = decode_attention_kernel(qkv.reshape(B, C, R, X, H), rope, k7.reshape(kv), v7.reshape(kv), layer[0],
                                        positions[:, 0], valid[:, 0], page_table, q_heads=q_heads,
                                        row_scale=row_scale, interpret=interpret)
    return out.reshape(B, T, C, R, q_heads, H), k.reshape(k7.shape), v.reshape(v7.shape)


_partitioned_decode = custom_partitioning(_decode_on_shard, static_argnums=(9, 10))


def _decode_shardings(mesh, axis):
    spec = lambda *s: NamedSharding(mesh, PartitionSpec(*s))  # noqa: E731
    qkv = spec(None, None, axis)
    kv = spec(None, None, axis)
    rep = spec()
    return (qkv, kv, kv), (qkv, rep, rep, kv, kv, rep, rep, rep, rep)


def _decode_axis(arg_shapes):
    spec = getattr(arg_shapes[3].sharding, "spec", None)
    return spec[2] if spec is not None and len(spec) > 2 else None


def _decode_infer(q_heads, interpret, mesh, arg_shapes, result_shape):
    del q_heads, interpret, result_shape
    return _decode_shardings(mesh, _decode_axis(arg_shapes))[0]


def _decode_partition(q_heads, interpret, mesh, arg_shapes, result_shape):
    del result_shape
    outs, args = _decode_shardings(mesh, _decode_axis(arg_shapes))
    return mesh, functools.partial(_decode_on_shard, q_heads=q_heads, interpret=interpret), outs, args


# Factors as above, plus c the tp axis (the only sharded one), x the projection's heads per
# position, n its query heads, w the two rope tables (the row scales are b alone).
_partitioned_decode.def_partition(
    partition=_decode_partition,
    infer_sharding_from_operands=_decode_infer,
    sharding_rule=("b t c r x h, b w h, u, r l c k p s h, r l c k p s h, b t, b t, b z "
                   ", b -> b t c r n h, r l c k p s h, r l c k p s h"),
    need_replication_factors=("b", "t", "r", "x", "h", "w", "u", "l", "k", "p", "s", "z", "n"),
)
