"""x @ (one layer of a stacked fp8 weight) * scale, as a Pallas kernel for NVIDIA GPUs (Triton).

Why a kernel: the model runs its layers with `lax.scan`, which takes each layer's weights out of
the stacked `[layers, ...]` buffers with a dynamic slice. For bf16 weights XLA folds that slice
into the cuBLAS call (dynamic-slice fusion), but neither its fp8 cuBLASLt call nor its Triton gemm
fusions take the slice in place: XLA copies the layer's fp8 weights out first, so an fp8 step read
its weights twice and ran slower than bf16 (BENCHMARKS.md, "fp8 weights"). This kernel takes the
whole stacked weight and the layer index, as `paged_attention` takes the whole KV cache, and reads
the layer's fp8 tiles where they lie.

How it works
- x: [M, K] activations; q: [layers * K, N] fp8 values (the stacked weight, contracted axes
  first, reshaped for free); scale: [layers, N] float32, one per output channel.
- One program owns a block of `block_m` rows, a block of `block_n` output columns and one of
  `num_splits` slices of K. It walks its K slice `block_k` at a time: loads the x tile and the fp8
  tile of layer `layer`, upcasts the weights to x's dtype in registers, and accumulates the
  product in float32 (Triton dot). The M blocks are the fastest grid axis, so the programs that
  read one weight tile run together and the later ones find it in L2.
- Split K (`num_splits` > 1) gives a small-batch step enough programs to fill the GPU; the
  partial sums are added in plain JAX, where XLA fuses the sum with the scale.
- The numerics are those of `quant.matmul`'s reference (the weight upcast to x's dtype, float32
  accumulation, the scale applied to the product), up to the order of the sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

_TARGET_PROGRAMS = 264  # about two per SM of an H100 / H200 (132 SMs)
_MAX_SPLITS = 16


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _gemm_kernel(layer_ref, x_ref, q_ref, s_ref, o_ref, *, k_dim: int, block_n: int, block_k: int,
                 steps: int, num_splits: int):
    """x_ref: [block_m, K]; q_ref: [layers * K, N] (whole); s_ref: [layers, N] (whole);
    o_ref: [block_m, block_n] (one split: scaled, x's dtype), else [block_m, block_n] float32."""
    n0 = pl.program_id(1) * block_n
    split = pl.program_id(2)
    layer = layer_ref[0]
    k_start = split * (steps * block_k)
    row0 = layer * k_dim + k_start
    cols = pl.ds(pl.multiple_of(n0, block_n), block_n)

    def body(i, acc):
        k0 = pl.multiple_of(k_start + i * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]  # [block_m, block_k]
        w = q_ref[pl.ds(row0 + i * block_k, block_k), cols]  # [block_k, block_n] fp8
        return acc + jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
    if num_splits == 1:
        scale = s_ref[pl.ds(layer, 1), cols]  # [1, block_n]
        o_ref[...] = (acc * scale).astype(o_ref.dtype)
    else:
        o_ref[...] = acc


def choose_blocks(m: int, k: int, n: int) -> tuple[int, int, int, int] | None:
    """(block_m, block_n, block_k, num_splits) for an [m, k] x [k, n] product, or None when the
    shape does not tile (a dim that no power-of-two block >= 16 divides)."""
    block_m = min(64, max(16, _next_pow2(m)))
    block_n = next((b for b in (128, 64, 32, 16) if n % b == 0), None)
    block_k = next((b for b in (256, 128, 64, 32, 16) if k % b == 0), None)
    if block_n is None or block_k is None:
        return None
    programs = -(-m // block_m) * (n // block_n)
    splits = 1
    while (programs * splits < _TARGET_PROGRAMS and splits < _MAX_SPLITS
           and k % (block_k * splits * 2) == 0 and k // (block_k * splits * 2) >= 2):
        splits *= 2
    return block_m, block_n, block_k, splits


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def fp8_gemm(x: jax.Array, q: jax.Array, scale: jax.Array, layer: jax.Array, *, block_m: int | None = None,
             block_n: int | None = None, block_k: int | None = None, num_splits: int | None = None,
             num_warps: int = 4, num_stages: int = 4, interpret: bool = False) -> jax.Array:
    """(x @ q[layer].astype(x.dtype)) * scale[layer], accumulated in float32, in x's dtype.

    x: [M, K]; q: [layers, K, N] float8_e4m3fn; scale: [layers, N] float32; layer: scalar int.
    Block sizes default to `choose_blocks`; a shape it cannot tile raises ValueError.
    """
    M, K = x.shape
    L, Kq, N = q.shape
    if Kq != K or scale.shape != (L, N):
        raise ValueError(f"x {x.shape}, q {q.shape} and scale {scale.shape} do not match "
                         f"([M, K], [layers, K, N], [layers, N])")
    chosen = choose_blocks(M, K, N)
    if chosen is None and None in (block_m, block_n, block_k, num_splits):
        raise ValueError(f"an fp8 gemm of [{M}, {K}] x [{K}, {N}] does not tile")
    block_m, block_n, block_k, num_splits = (given if given is not None else auto for given, auto in
                                             zip((block_m, block_n, block_k, num_splits), chosen or (None,) * 4))
    if N % block_n or K % (block_k * num_splits):
        raise ValueError(f"blocks n={block_n}, k={block_k} x {num_splits} splits do not tile [{K}, {N}]")
    m_blocks = -(-M // block_m)
    x_padded = jnp.pad(x, ((0, m_blocks * block_m - M), (0, 0)))
    steps = K // (block_k * num_splits)
    kernel = functools.partial(_gemm_kernel, k_dim=K, block_n=block_n, block_k=block_k, steps=steps,
                               num_splits=num_splits)
    out_dtype = x.dtype if num_splits == 1 else jnp.float32
    out_shape = jax.ShapeDtypeStruct((num_splits, m_blocks * block_m, N), out_dtype)
    out = pl.pallas_call(
        kernel,
        grid=(m_blocks, N // block_n, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, s: (0,)),  # layer
            pl.BlockSpec((block_m, K), lambda i, j, s: (i, 0)),  # x rows
            pl.BlockSpec((L * K, N), lambda i, j, s: (0, 0)),  # whole weight: indexed in-kernel
            pl.BlockSpec((L, N), lambda i, j, s: (0, 0)),  # whole scale
        ],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j)),
        out_shape=out_shape,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"fp8_gemm_m{block_m}_n{block_n}_k{block_k}_s{num_splits}",
    )(jnp.asarray(layer, jnp.int32).reshape(1), x_padded, q.reshape(L * K, N), scale)
    if num_splits == 1:
        return out[0, :M]
    return (jnp.sum(out[:, :M], axis=0) * scale[layer]).astype(x.dtype)
