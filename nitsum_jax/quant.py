"""fp8 weights: float8_e4m3fn values with a float32 scale per output channel, w ~= q * scale.

Only the linear weights of the layers are quantized (q/k/v/o, gate/up/down); the embedding,
the LM head and the norms stay in the model dtype. The LM head stays because every logit reads
it and the greedy token is its argmax: it is about 1/14 of Llama-3.1-8B's step bytes (1.05 of
15.0 GB), and keeping it exact keeps the logits closest to the unquantized model's.

A quantized weight is an `Fp8Weight` in the weight's place in the params pytree, so the model,
the weight buffers, the shardings and the checkpoints all see one tree. Its scale keeps the
weight's rank, with the contracted axes of size 1 ([layers, 1, heads, head_dim] for wq), so a
chunk of the weight and its scale are cut along the same axis; a weight whose chunks split its
input (wo, w_down) has a scale of size 1 on that axis, and every chunk holds all of it.

The matmul upcasts q to the activation dtype inside the dot and applies the scale to the
product: y = (x @ q) * scale. Decode steps on a GPU (up to 64 rows) run the layer gemms as a
Mosaic GPU kernel that reads the layer of the stacked fp8 buffer in place (`kernels.fp8_gemm`;
`Fp8Layer`, `layer_kernel`; on a lane of several devices each runs it on its own part of the
weights), which is why placed groups store their fp8 values with the input axes last. Other GPU
steps take XLA's Triton gemms, which fuse the upcast (cuBLAS has no bf16 x fp8 gemm; without
Triton XLA writes the upcast weights out, `step_options`) but not the layer loop's dynamic
slice: XLA copies each layer's fp8 values out first, so those steps are slower than bf16 ones
(docs/fp8.md). On a CPU the same program computes with the upcast weights.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
WEIGHT_FORMATS = ("bf16", "fp8")  # "bf16": unquantized, in the model dtype (float32 for `tiny`)
WEIGHT_CHOICES = ("auto",) + WEIGHT_FORMATS  # "auto": as the checkpoint stores them (a preset: bf16)

# The quantized weights and the axes their matmul contracts (stacked ones lead with `layers`).
CONTRACTED = {"wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2), "w_gate": (1,), "w_up": (1,), "w_down": (1,)}


class WeightFormatError(ValueError):
    """A weight format that is not one of WEIGHT_CHOICES."""


@struct.dataclass
class Fp8Weight:
    """A linear weight in fp8: `q * scale` approximates the original weight."""

    q: jax.Array  # the weight's shape, float8_e4m3fn (its input axes last: `inputs_last`)
    scale: jax.Array  # the weight's shape with the contracted axes of size 1, float32
    # A placed layer group's form (`model.group_of`): how many input axes (the first ones after
    # [layers, tp, chunks]) q holds moved last, after the output axes, as the decode kernel reads
    # it (one contiguous row of K values an output channel); 0: the weight's own order. The
    # scale keeps the weight's own order.
    inputs_last: int = struct.field(pytree_node=False, default=0)


def move_last(order, start: int, n: int) -> list:
    """`order` with its n entries from `start` moved to the end: how an `inputs_last` weight's
    axes are stored (axes, or einsum letters, after the `start` leading ones)."""
    order = list(order)
    return order[:start] + order[start + n:] + order[start:start + n]


def layer_cut(a: jax.Array, layer: jax.Array, used: int) -> jax.Array:
    """[layers, tp, chunks, ...] -> layer `layer`'s first `used` chunks [tp, used, ...]: one
    contiguous block per device, a dynamic slice XLA reads in place inside a bf16 gemm."""
    sizes = (1, a.shape[1], min(used, a.shape[2])) + a.shape[3:]
    return jax.lax.dynamic_slice(a, (layer,) + (0,) * (a.ndim - 1), sizes)[0]


@struct.dataclass
class Fp8Layer:
    """Layer `layer` of a stacked, `inputs_last` fp8 group weight, not yet cut out: the decode
    kernel reads it in place (`matmul`); anything else cuts it first, as for a bf16 weight."""

    w: Fp8Weight  # [layers, tp, chunks, ...]
    layer: jax.Array  # scalar int32
    used: int = struct.field(pytree_node=False, default=1)  # the chunks the lane reads

    def cut(self) -> Fp8Weight:
        """[tp, used, ...]: the layer's weights of the used chunks."""
        return jax.tree.map(lambda a: layer_cut(a, self.layer, self.used), self.w)


def check_format(weights: str) -> str:
    if weights not in WEIGHT_FORMATS:
        raise WeightFormatError(f"weight format {weights!r}; expected one of {list(WEIGHT_FORMATS)}")
    return weights


def scale_shape(shape: tuple[int, ...], contracted: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in contracted else n for i, n in enumerate(shape))


def channel_amax(w: jax.Array, contracted: tuple[int, ...]) -> jax.Array:
    """The largest |w| of each output channel, the weight's rank kept (float32)."""
    return jnp.max(jnp.abs(w.astype(jnp.float32)), axis=contracted, keepdims=True)


@functools.partial(jax.jit, static_argnums=1)
def quantize(w: jax.Array, contracted: tuple[int, ...], amax: jax.Array | None = None) -> Fp8Weight:
    """w: any shape; the scale of each output channel maps its largest |w| (or `amax`, when a
    piece of a weight is quantized as part of the whole) to e4m3's 448. Rounding to nearest
    even leaves |w - q * scale| <= max(|w| / 16, scale / 1024) (3 mantissa bits; 2^-9 is
    e4m3's smallest subnormal step, 448 = 1.75 * 2^8)."""
    if amax is None:
        amax = channel_amax(w, contracted)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)  # an all-zero channel: any scale is exact
    q = jnp.clip(w.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(FP8)
    return Fp8Weight(q=q, scale=scale)


def dequantize(w: Fp8Weight, dtype) -> jax.Array:
    return (w.q.astype(jnp.float32) * w.scale).astype(dtype)


def matmul(spec: str, x: jax.Array, w) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a weight of either format; `spec` names x's axes, then w's.

    An unquantized weight takes exactly today's einsum (bit-identical). An `Fp8Weight` is
    upcast inside the dot, accumulated in float32 and scaled per output channel; `spec`'s
    output must end with w's output axes in w's order (true of every matmul in `model`)."""
    if isinstance(w, Fp8Layer):
        y = layer_kernel(spec, x, w)
        if y is not None:
            return y
        w = w.cut()
    if not isinstance(w, Fp8Weight):
        return jnp.einsum(spec, x, w)
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    kept = [i for i, a in enumerate(w_axes) if a in out]
    if not out.endswith("".join(w_axes[i] for i in kept)):
        raise ValueError(f"einsum {spec!r}: the output must end with the weight's output axes")
    stored = "".join(move_last(w_axes, 2, w.inputs_last))  # [tp, chunks, ...] as stored
    y = jnp.einsum(f"{x_axes},{stored}->{out}", x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
    scale = w.scale.reshape([w.scale.shape[i] for i in kept])  # [output channels]
    return (y * scale).astype(x.dtype)


def use_kernel() -> bool:
    """Whether fp8 decode gemms run the Mosaic GPU kernel: on a GPU backend (`kernels.fp8_gemm`)."""
    return jax.default_backend() == "gpu"


def layer_kernel(spec: str, x: jax.Array, ref: Fp8Layer) -> jax.Array | None:
    """`spec`'s product by the decode kernel, reading the layer in place; None where it does not
    apply (not a GPU, too many rows, shapes it does not tile). On a lane of several devices each
    runs the kernel on its own part of the weight (`fp8_gemm.column_matmul`, `row_matmul`)."""
    from nitsum_jax.kernels import fp8_gemm

    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    q, scale = ref.w.q, ref.w.scale  # [L, tp, n, *outputs, *inputs] and [L, tp|1, n|1, ...] (own order)
    n_in = ref.w.inputs_last
    if not use_kernel():
        return None
    tp = q.shape[1]
    out_dims, in_dims = q.shape[3:q.ndim - n_in], q.shape[q.ndim - n_in:]
    n_out, k = math.prod(out_dims), math.prod(in_dims)
    column = w_axes[1] in out  # wqkv, gate/up: the chunks are output axes; wo, w_down: summed
    lead = x.shape[:len(x_axes) - (1 if column else 2 + n_in)]  # the rows' own axes (B, T)
    m = math.prod(lead)
    if not fp8_gemm.supported(n_out, k, m):
        return None
    layer_scale = jax.lax.dynamic_index_in_dim(scale, ref.layer, keepdims=False)  # [tp|1, n|1, ...]
    if column:  # x [B, T, D]; the used chunks' output channels are one contiguous run of rows
        w = q.reshape(q.shape[0], tp, q.shape[2] * n_out, k)
        y = fp8_gemm.column_matmul(x.reshape(m, k), w, ref.layer, n=ref.used * n_out)  # normed rows: exponent 0
        y = y * layer_scale[:, :ref.used].reshape(1, tp, -1)
        return y.astype(x.dtype).reshape(lead + (tp, ref.used) + tuple(out_dims))
    # x [B, T, tp, R, *inputs]: chunk r's inputs against piece r of the weight, summed
    w = q.reshape(q.shape[0], tp, q.shape[2], n_out, k)
    # w_down's input (silu(gate) * up) is the one not bounded by a norm or an average
    exponent = fp8_gemm.DOWN_EXPONENT if w_axes[2:] == "FD" else 0
    y = fp8_gemm.row_matmul(x.reshape(m, tp, ref.used, k), w, ref.layer, pieces=ref.used, exponent=exponent)
    return (y * layer_scale.reshape(1, -1)).astype(x.dtype).reshape(lead + tuple(out_dims))


def quantize_params(params, weights: str = "fp8"):
    """The params tree with its linear weights in `weights` format: quantized to fp8, or (for
    "bf16") upcast back to the model dtype, that of the embedding. Already so: unchanged."""
    check_format(weights)
    dtype = params.chunks[0].embed.dtype

    def convert(name, w):
        if weights == "fp8":
            return w if isinstance(w, Fp8Weight) else quantize(w, CONTRACTED[name])
        return dequantize(w, dtype) if isinstance(w, Fp8Weight) else w

    chunks = tuple(c.replace(**{n: convert(n, getattr(c, n)) for n in CONTRACTED}) for c in params.chunks)
    return params.replace(chunks=chunks)


def check_choice(weights: str) -> str:
    if weights not in WEIGHT_CHOICES:
        raise WeightFormatError(f"weights {weights!r}; expected one of {list(WEIGHT_CHOICES)}")
    return weights


def with_weights(params, weights: str):
    """`params` in the format a user asked for (`WEIGHT_CHOICES`); "auto" leaves them as they are."""
    return params if check_choice(weights) == "auto" else quantize_params(params, weights)


def weights_format(params) -> str:
    """The format of a params tree (concrete or abstract): "fp8" when its weights are quantized."""
    return weight_format(params.groups[0].wqkv if params.groups else params.chunks[0].wq)  # placed, or checkpoint form


def weight_format(weight) -> str:
    """The format of one weight (or of a run's `model.LayerGroup` weight): "fp8" or "bf16"."""
    return "fp8" if isinstance(weight, Fp8Weight) else "bf16"


def is_abstract(params) -> bool:
    """A tree of `ShapeDtypeStruct`s: a request for random weights of that form (`plans`)."""
    return all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params))


def step_options(params, devices: list) -> dict:
    """XLA options an fp8 model's steps need on a GPU on top of the lane's: Triton gemms, whose
    fusions take the upcast, for the gemms the decode kernel does not run (see the module docstring)."""
    if weights_format(params) != "fp8" or devices[0].platform != "gpu":
        return {}
    _warn_fp8_speed()
    return {"xla_gpu_enable_triton_gemm": True}


@functools.cache
def _warn_fp8_speed() -> None:
    """Once a process: where fp8 lanes on a GPU are slower than bf16 ones."""
    logging.getLogger("nitsum_jax").warning(
        "fp8 weights on a GPU: decode steps of up to 64 rows run the fp8 kernel (on one H200 1.4-1.5x the bf16 "
        "step at batch 1-8, 1.1-1.2x at 32-64; lanes of several GPUs run it on each device's part of the weights, "
        "not yet timed); prefill steps and larger batches take XLA gemms that copy each layer's fp8 slice first "
        "(decode steps that way ran at 0.58-0.67x; docs/fp8.md)")


def numpy_quantize(w: np.ndarray, contracted: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """`quantize` on the host CPU, for checkpoint conversion: (q, scale) as NumPy arrays."""
    with jax.default_device(jax.devices("cpu")[0]):
        out = quantize(jnp.asarray(w), contracted)
    return np.asarray(out.q), np.asarray(out.scale)
