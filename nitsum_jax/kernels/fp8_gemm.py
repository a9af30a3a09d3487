"""The fp8-weight gemm of decode steps on Hopper: few rows of activations times one layer of a
stacked fp8 weight, read in place (Pallas Mosaic GPU).

XLA copies each layer's fp8 slice out of the stacked weights before its gemm (cuBLAS has no
bf16 x fp8 gemm, and XLA folds the layer loop's dynamic slice only into a bf16 cuBLAS call; see
docs/fp8.md), so an fp8 decode step read its weights twice. This kernel takes the whole stacked
buffer and the layer index and streams that layer's tiles from HBM with TMA copies.

The product is computed transposed, y^T = W @ x^T, so the weight is the wgmma's left operand:
64 output channels a warpgroup, its fp8 tile upcast in registers (to float16: sm_90's cvt has
no e4m3 -> bf16 form), times the activation tile from shared memory, accumulated in float32.
The activations are cast to float16 after a fixed power-of-two scaling, x * 2^-e, and the
product multiplied back by 2^e (`to_float16`): float16's 11 significant bits hold every bf16
value (8 bits) whose scaled magnitude lies in [2^-17, 2^16), so the cast is exact for
|x| in [2^(e-17), 2^(e+16)); smaller values round to multiples of 2^(e-24), far under the fp8
weights' own rounding. The inputs that come out of an RMSNorm (|x| <= sqrt(dim) * the norm
weight: 64 x it for Llama-3.1-8B) or an attention average (within the values' range) take e = 0;
w_down's input, silu(gate) * up, where Llama models grow their largest activations, takes
`DOWN_EXPONENT` (exact up to 2^24, about 1.7e7). A fixed exponent costs nothing: the scaling fuses
into the cast's producer and the multiply back into the scale's; a per-row one needs a reduction
a gemm (0.1 ms of a Llama-3.1-8B b8 step for w_down alone, 1x H200).
Few output tiles (wo, w_down: 64 of them for Llama-3.1-8B) would leave SMs idle, so the
contracted axis is also split `splits` ways; the partial sums come back [pieces * splits, N, M]
and the caller adds them (with the scale and the transpose, one small XLA fusion).

Weights are [L, P, N, K]: L layers, P pieces of the contracted axis (the chunks of a weight
whose chunks split its input; 1 otherwise), N output channels, K contracted (contiguous): the
layout `model.group_of` gives fp8 weights. Only the first `pieces` of P are read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ROWS = 64  # output channels a program (one warpgroup's wgmma M)
TILE_K = 128  # contracted elements a pipeline step (128 bytes of fp8: the widest swizzle)
STAGES = 4  # TMA copies in flight a program (6 and 8 were slower: fewer programs fit an SM)
MAX_ROWS = 64  # activation rows the kernel takes (decode batches); more: XLA's gemm
# Split the contracted axis until there are this many programs (132 SMs): the best of the tile
# sweep for every Llama-3.1-8B gemm (BENCHMARKS.md "fp8 weights"): 256 up to 16 rows; from 32
# rows, where each program re-reads a larger activation tile, q/k/v ran 15% faster with 192.
MIN_PROGRAMS, MIN_PROGRAMS_WIDE = 256, 192


def supported(n: int, k: int, m: int) -> bool:
    """Whether the kernel takes N output channels, K contracted a piece, M rows."""
    return n % ROWS == 0 and k % TILE_K == 0 and 0 < m <= MAX_ROWS


def splits_for(n: int, k: int, pieces: int, m: int = 8) -> int:
    """How many ways to split each piece's contracted axis for M rows: the fewest that give
    MIN_PROGRAMS programs (MIN_PROGRAMS_WIDE above 16 rows), each still a few pipeline steps long."""
    target = MIN_PROGRAMS if m <= 16 else MIN_PROGRAMS_WIDE
    splits = 1
    while (n // ROWS) * pieces * splits < target and k % (2 * splits * TILE_K) == 0 \
            and k // (2 * splits * TILE_K) >= 4:
        splits *= 2
    return splits


def _transforms(minor: int, dtype):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


@functools.partial(jax.jit, static_argnames=("pieces", "splits", "n", "rows", "stages", "delay"))
def partial_products(x: jax.Array, w: jax.Array, layer: jax.Array, *, pieces: int, splits: int, n: int,
                     rows: int = ROWS, stages: int = STAGES, delay: int = 0) -> jax.Array:
    """x [M, pieces * K] (M a multiple of 8), w [L, P, >= n, K] fp8, layer int32 [1] -> float32
    [pieces * splits, n, M]: the partial products of w[layer, p, :n] with x's piece p, summed
    over a split of K each. `rows` output channels a program (64 a warpgroup's wgmma), `stages`
    copies in flight, `delay`: wgmmas left running a step (their tiles released a step later)."""
    import jax.experimental.pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m = x.shape[0]
    k = w.shape[3]
    per_split = k // splits

    def body(layer_ref, x_ref, w_ref, out_ref, out_smem):
        li = layer_ref[0]
        out_rows = pl.ds(jax.lax.axis_index("n") * rows, rows)
        part = jax.lax.axis_index("s")  # piece * splits + split
        piece = part // splits
        cols = pl.ds((part % splits) * per_split, per_split)

        def accumulate(acc):
            def step(_, w_tile, x_tile):
                plgpu.wgmma(acc, w_tile[...].astype(jnp.float16), plgpu.transpose_ref(x_tile, (1, 0)))
                plgpu.wgmma_wait(delay)

            plgpu.emit_pipeline(
                step, grid=(per_split // TILE_K,), max_concurrent_steps=stages,
                in_specs=[plgpu.BlockSpec((rows, TILE_K), lambda kk: (0, kk), transforms=_transforms(TILE_K, w.dtype),
                                          delay_release=delay),
                          plgpu.BlockSpec((m, TILE_K), lambda kk: (0, kk), transforms=_transforms(TILE_K, x.dtype),
                                          delay_release=delay)],
            )(w_ref.at[li, piece, out_rows, cols], x_ref.at[:, pl.ds(piece * k, k)].at[:, cols])
            if delay:
                plgpu.wgmma_wait(0)
            return acc[...]

        out_smem[...] = pl.run_scoped(accumulate, plgpu.ACC((rows, m), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[part, out_rows])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((pieces * splits, n, m), jnp.float32),
        scratch_types=dict(out_smem=plgpu.SMEM((rows, m), jnp.float32)),
        grid=(n // rows, pieces * splits), grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return kernel(layer, x, w)


DOWN_EXPONENT = 8  # w_down's input is scaled by 2^-8 as it is cast (see the module docstring)


def to_float16(x: jax.Array, exponent: int = 0) -> jax.Array:
    """x * 2^-exponent in float16: exact for |x| in [2^(exponent-17), 2^(exponent+16)) when x is
    bf16 (a power of two only moves the exponent, and float16 has more significant bits)."""
    return (x.astype(jnp.float32) * 2.0 ** -exponent).astype(jnp.float16)


def matmul(x: jax.Array, w: jax.Array, layer: jax.Array, *, pieces: int = 1, n: int | None = None,
           exponent: int = 0) -> jax.Array:
    """x [M, pieces * K] times layer `layer` of w [L, P, N, K] (fp8), its first `pieces` pieces
    summed and its first `n` output channels (default all): float32 [M, n], unscaled. M is
    padded to a multiple of 8 (the wgmma's N). x reaches the kernel as `to_float16(x, exponent)`
    and the product is multiplied back by 2^exponent."""
    m = x.shape[0]
    padded = -(-m // 8) * 8
    if padded != m:
        x = jnp.pad(x, ((0, padded - m), (0, 0)))
    n = w.shape[2] if n is None else n
    parts = partial_products(to_float16(x, exponent), w, jnp.asarray(layer, jnp.int32).reshape(1), pieces=pieces,
                             splits=splits_for(n, w.shape[3], pieces, padded), n=n)
    y = parts.sum(axis=0).T
    return (y * 2.0 ** exponent if exponent else y)[:m]


def column_matmul(x: jax.Array, w: jax.Array, layer: jax.Array, *, n: int, exponent: int = 0) -> jax.Array:
    """x [M, K] times layer `layer` of w [L, tp, N, K] (fp8), the first `n` output channels of
    each of tp's parts: float32 [M, tp, n], unscaled. On a lane of several devices (tp sharded)
    each device runs the kernel on its own output channels (`_column_partitioned`)."""
    run = _column_on_shard if w.shape[1] == 1 else _column_partitioned  # one device: its own part is all
    return run(x, w, jnp.asarray(layer, jnp.int32).reshape(1), n, exponent)


def row_matmul(x: jax.Array, w: jax.Array, layer: jax.Array, *, pieces: int, exponent: int = 0) -> jax.Array:
    """x [M, tp, pieces, K] times layer `layer` of w [L, tp, P, n, K] (fp8), summed over tp and the
    first `pieces` of P: float32 [M, n], unscaled. On a lane of several devices (tp sharded) each
    device sums its own pieces with the kernel and the partitioner adds the devices' sums."""
    run = _row_on_shard if w.shape[1] == 1 else _row_partitioned
    return run(x, w, jnp.asarray(layer, jnp.int32).reshape(1), pieces, exponent).sum(axis=0)


# -- lanes of several devices --------------------------------------------------------------
# Lanes jit their steps with shardings (GSPMD / Shardy); an opaque kernel call would make the
# partitioner gather the weights onto every device. `custom_partitioning` says the kernel runs
# per device on its own part of the tp axis: for column weights (q/k/v, gate/up) its output
# channels, for row weights (o, down) its share of the contracted axis, whose partial sums come
# back with the tp axis leading for the partitioner to add.


def _column_on_shard(x, w, layer, n, exponent):
    """x [M, K]; w [L, t, N, K] (t = 1 on a device of the lane) -> float32 [M, t, n]."""
    return jnp.stack([matmul(x, w[:, i:i + 1], layer, n=n, exponent=exponent) for i in range(w.shape[1])], axis=1)


def _row_on_shard(x, w, layer, pieces, exponent):
    """x [M, t, p, K]; w [L, t, P, n, K] (t = 1 on a device) -> float32 [t, M, n], each part's sum."""
    m, t, p, k = x.shape
    return jnp.stack([matmul(x[:, i].reshape(m, p * k), w[:, i], layer, pieces=pieces, exponent=exponent)
                      for i in range(t)])


def _tp_axis(w_shape):
    spec = getattr(w_shape.sharding, "spec", None)
    return spec[1] if spec is not None and len(spec) > 1 else None


def _spec(mesh, *axes):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*axes))


def _column_infer(n, exponent, mesh, arg_shapes, result_shape):
    return _spec(mesh, None, _tp_axis(arg_shapes[1]))


def _column_partition(n, exponent, mesh, arg_shapes, result_shape):
    axis = _tp_axis(arg_shapes[1])
    return (mesh, functools.partial(_column_on_shard, n=n, exponent=exponent), _spec(mesh, None, axis),
            (_spec(mesh), _spec(mesh, None, axis), _spec(mesh)))


def _row_infer(pieces, exponent, mesh, arg_shapes, result_shape):
    return _spec(mesh, _tp_axis(arg_shapes[1]))


def _row_partition(pieces, exponent, mesh, arg_shapes, result_shape):
    axis = _tp_axis(arg_shapes[1])
    return (mesh, functools.partial(_row_on_shard, pieces=pieces, exponent=exponent), _spec(mesh, axis),
            (_spec(mesh, None, axis), _spec(mesh, None, axis), _spec(mesh)))


def _partitioned(on_shard, infer, partition, rule, replicated):
    from jax.experimental.custom_partitioning import custom_partitioning

    fn = custom_partitioning(on_shard, static_argnums=(3, 4))
    fn.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     need_replication_factors=replicated)
    return fn


# Factors: m rows, k contracted, l layers, t the tp axis (the only sharded one), o output channels
# (n of the weight's N for columns), u the layer index, p / q the pieces read / held.
_column_partitioned = _partitioned(_column_on_shard, _column_infer, _column_partition,
                                   "m k, l t n k, u -> m t o", ("m", "k", "l", "n", "u", "o"))
_row_partitioned = _partitioned(_row_on_shard, _row_infer, _row_partition,
                                "m t p k, l t q o k, u -> t m o", ("m", "p", "k", "l", "q", "o", "u"))


def reference_partial_products(x: jax.Array, w: jax.Array, layer: jax.Array, *, pieces: int, splits: int, n: int,
                               **_) -> jax.Array:
    """What `partial_products` computes, in plain JAX (float32): the tests' oracle on hosts
    without the kernel's GPU."""
    k = w.shape[3]
    per_split = k // splits
    wl = jax.lax.dynamic_index_in_dim(w, layer[0], keepdims=False).astype(jnp.float32)  # [P, N, K]
    parts = []
    for p in range(pieces):
        for s in range(splits):
            cols = slice(s * per_split, (s + 1) * per_split)
            xs = x[:, p * k:(p + 1) * k][:, cols].astype(jnp.float32)
            parts.append(wl[p, :n, cols] @ xs.T)
    return jnp.stack(parts)
