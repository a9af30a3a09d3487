"""The Llama family as pure functions over a params pytree.

Every weight is declared once (`declare`): shape, logical axes and initializer. `init_params`,
`abstract_params` and `param_specs` (the PartitionSpec tree for a mesh) all derive from that
one declaration, so they cannot drift apart. Layers are stacked on a leading `layers` axis
and run with `lax.scan`, which keeps compile time flat in depth (80 layers for 70B).

Axis letters used in einsums: B batch, T new tokens, D model dim, N query heads,
K kv heads, G query heads per kv head, H head dim, F ffn dim, V vocab, S cache positions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from nitsum_jax.attention import KVCache, write_kv_pages
from nitsum_jax.kernels import paged_attention
from nitsum_jax.kernels.decode_attention import rope_rows
from nitsum_jax.kernels.dispatch import decode_attention, resolve as resolve_attention
from nitsum_jax.config import LlamaConfig
from nitsum_jax.quant import (CONTRACTED, Fp8Layer, Fp8Weight, check_format, layer_cut, layer_kernel, matmul, move_last,
                              quantize_params, scale_shape)


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    """One weight, abstractly: shape, logical axis names and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (scaled by fan-in) or "ones"
    fan_in: int = 1
    dtype: str | None = None  # None: the model dtype; fp8 weights and their scales name theirs


@struct.dataclass
class ChunkWeights:
    """The weights split by tensor parallelism, for one chunk slot.

    A model is cut into C chunks along its `tp` axes (heads, kv heads, ffn columns, model dim
    for the vocabulary tables). On a lane every device holds R = C / tp chunks, one buffer
    each; chunk slot r of the lane is one global array sharded over `tp`. Because each chunk
    is its own buffer, a device keeps one copy of a chunk for every lane of every plan that
    places that chunk on it (see `plans`). The unsplit model is the case C = R = 1.
    """

    # The linear weights are arrays, or `Fp8Weight`s of the same shape (`quant`).
    wq: jax.Array | Fp8Weight  # [layers, dim, heads/R, head_dim]
    wk: jax.Array | Fp8Weight  # [layers, dim, kv_heads/R, head_dim]
    wv: jax.Array | Fp8Weight  # [layers, dim, kv_heads/R, head_dim]
    wo: jax.Array | Fp8Weight  # [layers, heads/R, head_dim, dim]
    w_gate: jax.Array | Fp8Weight  # [layers, dim, ffn/R]
    w_up: jax.Array | Fp8Weight  # [layers, dim, ffn/R]
    w_down: jax.Array | Fp8Weight  # [layers, ffn/R, dim]
    embed: jax.Array  # [vocab, dim/R]
    lm_head: jax.Array | None  # [dim/R, vocab]; None when tied to `embed`


@struct.dataclass
class LayerGroup:
    """The layer weights of a run of chunks as ONE buffer per weight on each device: a placed
    lane's form (`plans.weights`). A lane's chunk positions on a device are read by one gemm per
    weight, batched over the chunks, as a one-chunk lane reads its single chunk; checkpoints and
    `declare` keep the per-chunk form (`ChunkWeights`).

    The lane's devices are axis 1 (`tp`), the device's chunks axis 2 (n of them); a buffer may
    hold more chunks than the lane uses: lanes of a plan set share it, each reading its first
    `used` chunks in place (a contiguous block of each layer).
    wqkv: [layers, tp, n, dim, q + 2 kv heads per chunk, head_dim]; wo: [layers, tp, n, heads per
    chunk, head_dim, dim]; w_gate_up: [layers, tp, n, dim, 2, ffn per chunk], the gate and up
    projections side by side, so one gemm reads both (on an H200, two N=14336 gemms of a b8 step
    ran at 3.9 TB/s; BENCHMARKS.md "Decode roofline"); w_down: [layers, tp, n, ffn per chunk, dim].
    An fp8 weight's scale keeps the rank (size 1 on the axes its matmul contracts; wo's and
    w_down's are the whole weight's, the same for every chunk: [layers, 1, 1, ..., dim]).

    `norms_folded` (`fold_norms`): wqkv and w_gate_up hold the RMSNorm weights of their layer
    multiplied into their rows, so `forward` feeds them the residual stream itself and scales
    their outputs by each row's 1 / rms.
    """

    wqkv: jax.Array | Fp8Weight
    wo: jax.Array | Fp8Weight
    w_gate_up: jax.Array | Fp8Weight
    w_down: jax.Array | Fp8Weight
    used: int = struct.field(pytree_node=False, default=1)
    norms_folded: bool = struct.field(pytree_node=False, default=False)

    @property
    def chunks_held(self) -> int:
        return _values(self.wqkv).shape[2]

    def at_layer(self, layer: jax.Array) -> "LayerGroup":
        """Layer `layer`'s weights of the used chunks ([tp, used, ...]): one contiguous block per
        device, a dynamic slice XLA reads in place inside the gemm. fp8 weights stay whole, as
        `quant.Fp8Layer`s: the decode kernel reads them in place, other steps cut them then."""
        def one(w):
            if isinstance(w, Fp8Weight) and w.inputs_last:
                return Fp8Layer(w=w, layer=layer, used=self.used)
            return jax.tree.map(lambda a: layer_cut(a, layer, self.used), w)
        return self.replace(**{name: one(getattr(self, name)) for name in GROUP_INPUTS})


# A group weight's input (contracted) axes: the first this many after [layers, tp, chunks]. fp8
# group weights store them last (`quant.Fp8Weight.inputs_last`).
GROUP_INPUTS = {"wqkv": 1, "wo": 2, "w_gate_up": 1, "w_down": 1}


def inputs_last(q, name: str):
    """A stacked group weight's values [layers, tp, chunks, *inputs, *outputs] with the inputs
    moved last (NumPy or JAX)."""
    return q.transpose(move_last(range(q.ndim), 3, GROUP_INPUTS[name]))


def inputs_first(w: Fp8Weight) -> Fp8Weight:
    """An `inputs_last` group weight in the weight's own axis order (tests, inspection)."""
    if not w.inputs_last:
        return w
    outputs = w.q.ndim - 3 - w.inputs_last
    return Fp8Weight(q=w.q.transpose(move_last(range(w.q.ndim), 3, outputs)), scale=w.scale)


def _values(w):
    return w.q if isinstance(w, Fp8Weight) else w


def group_of(chunks: list["ChunkWeights"], used: int | None = None) -> LayerGroup:
    """The LayerGroup of one device's run of chunks (per-chunk pieces as `plans.weights.chunk_slice`
    cuts them, NumPy or JAX arrays alike), tp axis of size 1: q, k and v concatenated per chunk,
    the chunks stacked on axis 2. `used`: how many the lane reads (default all)."""
    first = _values(chunks[0].wq)
    xp = np if isinstance(first, np.ndarray) else jnp

    def stack(name: str, pieces_of=lambda c, name: getattr(c, name), shared_scale: bool = False):
        ws = [pieces_of(c, name) for c in chunks]
        if isinstance(ws[0], Fp8Weight):  # values inputs last, for the decode kernel (`quant`)
            q = inputs_last(xp.stack([w.q for w in ws], axis=1)[:, None], name)
            scales = [ws[0].scale] if shared_scale else [w.scale for w in ws]
            return Fp8Weight(q=q, scale=xp.stack(scales, axis=1)[:, None], inputs_last=GROUP_INPUTS[name])
        return xp.stack(ws, axis=1)[:, None]

    def qkv(c, _):
        return jax.tree.map(lambda q, k, v: xp.concatenate([q, k, v], axis=2), c.wq, c.wk, c.wv)

    def gate_up(c, _):
        return jax.tree.map(lambda g, u: xp.stack([g, u], axis=-2), c.w_gate, c.w_up)

    return LayerGroup(wqkv=stack("wqkv", qkv), wo=stack("wo", shared_scale=True), w_gate_up=stack("w_gate_up", gate_up),
                      w_down=stack("w_down", shared_scale=True),
                      used=len(chunks) if used is None else used)


def fold_norms(group: LayerGroup, attn_norm: jax.Array | None, mlp_norm: jax.Array | None) -> LayerGroup:
    """`group` with each layer's RMSNorm weights [layers, dim] multiplied into the rows of the
    weights that read the normalised stream: RMSNorm(x) @ W = (x @ (diag(g) W)) / rms(x), so a
    step runs no norm-scaling kernel before its gemms and no copy of the layer's norm rows (on
    an H200 the norms cost about 0.25 ms of a 4.9 ms Llama-3.1-8B b8 step, BENCHMARKS.md "Decode
    roofline"). The products are rounded once to the weights' dtype. fp8 weights are returned as
    they are (their scales are per output channel; folding would re-quantize them). Norms of None
    are ones: the group is marked folded, its weights unchanged."""
    if isinstance(group.wqkv, Fp8Weight) or group.norms_folded:
        return group
    if attn_norm is None and mlp_norm is None:
        return group.replace(norms_folded=True)

    def times(w, g):  # w: [layers, tp, n, dim, ...]; g: [layers, dim]
        g = g.reshape(g.shape[:1] + (1, 1) + g.shape[1:] + (1,) * (w.ndim - 4))
        return (w.astype(jnp.float32) * g.astype(jnp.float32)).astype(w.dtype)

    return group.replace(wqkv=times(group.wqkv, attn_norm), w_gate_up=times(group.w_gate_up, mlp_norm),
                         norms_folded=True)


@struct.dataclass
class Params:
    attn_norm: jax.Array  # [layers, dim]
    mlp_norm: jax.Array  # [layers, dim]
    final_norm: jax.Array  # [dim]
    chunks: tuple[ChunkWeights, ...]  # R chunk positions (a placed lane's: their vocabulary tables only)
    # A placed lane's layer weights (`LayerGroup`s covering the R positions in order); empty in
    # the checkpoint form, whose chunks hold every weight.
    groups: tuple[LayerGroup, ...] = ()


# The axis of each chunked weight that the chunks cut (the one `tp` shards); an fp8 weight's
# values and scale are cut on the same axis.
CHUNK_AXIS = {"wq": 2, "wk": 2, "wv": 2, "wo": 1, "w_gate": 2, "w_up": 2, "w_down": 1, "embed": 1, "lm_head": 0}


def declare(cfg: LlamaConfig, weights: str = "bf16") -> Params:
    """The single declaration of every weight of `cfg` (leaves are `ParamDecl`), unsplit; with
    `weights="fp8"` each linear weight is an `Fp8Weight` of two declarations."""
    L, D, N, K, H, F, V = (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.ffn_dim, cfg.vocab_size)
    chunk = ChunkWeights(
        wq=ParamDecl((L, D, N, H), ("layers", None, "heads", None), fan_in=D),
        wk=ParamDecl((L, D, K, H), ("layers", None, "kv_heads", None), fan_in=D),
        wv=ParamDecl((L, D, K, H), ("layers", None, "kv_heads", None), fan_in=D),
        wo=ParamDecl((L, N, H, D), ("layers", "heads", None, None), fan_in=N * H),
        w_gate=ParamDecl((L, D, F), ("layers", None, "ffn"), fan_in=D),
        w_up=ParamDecl((L, D, F), ("layers", None, "ffn"), fan_in=D),
        w_down=ParamDecl((L, F, D), ("layers", "ffn", None), fan_in=F),
        embed=ParamDecl((V, D), ("vocab", "embed"), fan_in=1),
        lm_head=None if cfg.tie_embeddings else ParamDecl((D, V), ("embed", "vocab"), fan_in=D),
    )
    if check_format(weights) == "fp8":
        chunk = chunk.replace(**{n: _fp8_decl(getattr(chunk, n), CONTRACTED[n]) for n in CONTRACTED})
    return Params(
        attn_norm=ParamDecl((L, D), ("layers", None), "ones"),
        mlp_norm=ParamDecl((L, D), ("layers", None), "ones"),
        final_norm=ParamDecl((D,), (None,), "ones"),
        chunks=(chunk,),
    )


def _fp8_decl(d: ParamDecl, contracted: tuple[int, ...]) -> Fp8Weight:
    """fp8 values of the weight's shape and axes; a float32 scale per output channel."""
    axes = tuple(None if i in contracted else a for i, a in enumerate(d.axes))
    return Fp8Weight(q=dataclasses.replace(d, dtype="float8_e4m3fn"),
                     scale=ParamDecl(scale_shape(d.shape, contracted), axes, "ones", dtype="float32"))


def _is_decl(x) -> bool:
    return isinstance(x, ParamDecl)


def map_decls(fn: Callable[[ParamDecl], object], decls: Params) -> Params:
    return jax.tree.map(fn, decls, is_leaf=_is_decl)


def _dtype(cfg: LlamaConfig, d: ParamDecl):
    return cfg.jnp_dtype if d.dtype is None else jnp.dtype(d.dtype)


def abstract_params(cfg: LlamaConfig, shardings: Params | None = None, weights: str = "bf16") -> Params:
    """`ShapeDtypeStruct` tree (optionally carrying shardings) for `eval_shape`/Orbax restore."""
    decls = declare(cfg, weights)
    if shardings is None:
        return map_decls(lambda d: jax.ShapeDtypeStruct(d.shape, _dtype(cfg, d)), decls)
    return jax.tree.map(lambda d, s: jax.ShapeDtypeStruct(d.shape, _dtype(cfg, d), sharding=s), decls, shardings,
                        is_leaf=_is_decl)


def init_params(cfg: LlamaConfig, key: jax.Array, weights: str = "bf16") -> Params:
    """Random weights (normal, std 1/sqrt(fan_in)); norms start at one. `weights="fp8"`: the
    same weights, quantized."""
    if check_format(weights) == "fp8":
        return quantize_params(init_params(cfg, key))
    decls = declare(cfg)
    leaves, treedef = jax.tree.flatten(decls, is_leaf=_is_decl)
    keys = jax.random.split(key, len(leaves))

    def one(d: ParamDecl, k):
        if d.init == "ones":
            return jnp.ones(d.shape, cfg.jnp_dtype)
        return (jax.random.normal(k, d.shape, jnp.float32) / math.sqrt(d.fan_in)).astype(cfg.jnp_dtype)

    return jax.tree.unflatten(treedef, [one(d, k) for d, k in zip(leaves, keys)])


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis name (or None: replicated)."""

    mapping: tuple[tuple[str, str | None], ...]

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        table = dict(self.mapping)
        mesh_axes = [table.get(a) if a else None for a in axes]
        used = [m for m in mesh_axes if m is not None]
        if len(used) != len(set(used)):
            raise ValueError(f"sharding rules map two logical axes of {axes} onto one mesh axis: {mesh_axes}")
        return PartitionSpec(*mesh_axes)


# Megatron-style tensor parallelism: heads and ffn columns are split over `tp`, so each layer
# needs one all-reduce after attention and one after the MLP. The vocabulary tables are split
# on the model dim: the embedding lookup then gathers [B, T, D] activations, and the logits
# are a partial sum all-reduced once per step.
TP_RULES = ShardingRules((("heads", "tp"), ("kv_heads", "tp"), ("ffn", "tp"), ("embed", "tp")))


def param_specs(cfg: LlamaConfig, rules: ShardingRules = TP_RULES, weights: str = "bf16") -> Params:
    return map_decls(lambda d: rules.spec(d.axes), declare(cfg, weights))


def param_count(cfg: LlamaConfig) -> int:
    return sum(int(np.prod(d.shape)) for d in jax.tree.leaves(declare(cfg), is_leaf=_is_decl))


# --- layers -------------------------------------------------------------------------------

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [..., D]; normalise in fp32, cast back, then scale (the order transformers uses)."""
    return (x.astype(jnp.float32) * rms_scale(x, eps)).astype(x.dtype) * weight


def rms_scale(x: jax.Array, eps: float) -> jax.Array:
    """x: [..., D] -> [..., 1] float32: 1 / rms(x), the factor RMSNorm scales each row by."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """[head_dim // 2] inverse frequencies, with Llama 3.1 scaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [B, T, ..., H] (any head axes); positions: [B, T]. Half-split rotation (the HF weight layout)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, H/2]
    heads = (1,) * (x.ndim - 3)
    cos = jnp.cos(angles).reshape(angles.shape[:2] + heads + angles.shape[2:])
    sin = jnp.sin(angles).reshape(angles.shape[:2] + heads + angles.shape[2:])
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Which chunk each chunk slot of each lane device holds (static: part of a lane's program).

    `assign[i][r]` is the chunk in slot r on the lane's i-th device (mesh order). Chunks are
    interchangeable for attention heads and ffn columns (they are summed), so any assignment is
    valid; only the model dim of the vocabulary tables needs the order, given by `dim_order`.
    """

    num_chunks: int
    assign: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        flat = sorted(c for row in self.assign for c in row)
        if flat != list(range(self.num_chunks)) or len({len(row) for row in self.assign}) != 1:
            raise ValueError(f"chunk assignment {self.assign} is not a partition of {self.num_chunks} chunks "
                             f"into equal slots per device")

    @property
    def tp(self) -> int:
        return len(self.assign)

    @property
    def slots(self) -> int:
        return len(self.assign[0])

    def dim_order(self, dim: int) -> np.ndarray:
        """[dim] model dim held at each position of the slot-concatenated (slot-major,
        then device-major) vocabulary-table pieces."""
        per_chunk = dim // self.num_chunks
        order = [self.assign[i][r] * per_chunk + j for r in range(self.slots) for i in range(self.tp)
                 for j in range(per_chunk)]
        return np.asarray(order, np.int32)


UNSPLIT = ChunkLayout(1, ((0,),))


@struct.dataclass
class StepInput:
    """What one model step needs besides weights and cache. Arrays only; shapes are the bucket."""

    tokens: jax.Array  # [B, T] int32, new tokens (padded)
    start_pos: jax.Array  # [B] int32, cache length before this step
    num_new: jax.Array  # [B] int32, valid entries of `tokens` per row (0 = idle slot)
    page_table: jax.Array  # [B, pages_per_seq] int32, page ids of each sequence


def embed_tokens(params: Params, tokens: jax.Array, layout: ChunkLayout) -> jax.Array:
    """tokens: [B, T] -> [B, T, D] in model dim order."""
    pieces = [jnp.take(c.embed, tokens, axis=0) for c in params.chunks]  # R x [B, T, D/R]
    x = jnp.concatenate(pieces, axis=-1)
    if layout.num_chunks == 1:
        return x
    return x[..., np.argsort(layout.dim_order(x.shape[-1]))]


def _own(h: jax.Array, tag: int) -> jax.Array:
    """`h` as a value of its own, so XLA's dot merger cannot fuse the matmuls that share it: it
    would concatenate their weights (the groups of a lane; gate and up before they shared a buffer)
    into a new buffer on every step, measured at 7.5 ms of a 21 ms Llama-3.1-8B TP1 step on an
    H100 (BENCHMARKS.md)."""
    return jax.lax.optimization_barrier((h, jnp.int32(tag)))[0]


def _column_matmul(h: jax.Array, w, out: str, tag: int, rows_last: bool = False) -> jax.Array:
    """h [B, T, D] times a column-cut group weight [tp, R, D, *out] -> [B, T, tp, R, *out]. Over
    several chunks a batched gemm (h broadcast over R): each chunk's [D, out] block is contiguous
    in the buffer, so the gemm reads the weights in place. Fewer than MIN_BATCHED_ROWS rows are
    padded to that many first: cuBLAS's batched kernels for a single row were slower (a b1 step
    of a four-chunk lane 6.30 ms against 5.96 at b8, BENCHMARKS.md "Decode roofline").
    `rows_last` (one chunk, bf16 weights): the gemm writes its output transposed, rows last, and
    the consumer reads it back; cuBLAS then picks another kernel (`forward` says when). XLA's
    gemms read h through `_own(h, tag)`; the fp8 decode kernel, which no dot merger sees, reads
    it as it is, so its float16 cast fuses into the norm that makes h."""
    if isinstance(w, Fp8Layer):  # the decode kernel reads the layer in place where it applies
        y = layer_kernel(f"BTD,CRD{out}->BTCR{out}", h, w)
        if y is not None:
            return y
        w = w.cut()
    h = _own(h, tag)
    chunks = _values(w).shape[1]
    if chunks == 1 and rows_last and not isinstance(w, Fp8Weight):
        y = matmul(f"BTD,CRD{out}->CR{out}BT", h, w)
        return jnp.moveaxis(jnp.moveaxis(y, -1, 0), -1, 0)
    if chunks == 1:
        return matmul(f"BTD,CRD{out}->BTCR{out}", h, w)
    B, T, D = h.shape
    rows = h.reshape(B * T, 1, D)
    if B * T < MIN_BATCHED_ROWS:
        rows = jnp.pad(rows, ((0, MIN_BATCHED_ROWS - B * T), (0, 0), (0, 0)))
    y = matmul(f"RBTD,CRD{out}->BTCR{out}", jnp.broadcast_to(rows, (chunks,) + rows.shape), w)
    return y[:B * T].reshape((B, T) + y.shape[2:])


MIN_BATCHED_ROWS = 8
# Decode steps of this many rows or more compute gate/up with the output transposed: for the
# merged [dim, 2 x ffn] weight at 128 rows cuBLAS's own choice (a 448x64 tile) ran at 2.4 TB/s,
# the transposed problem's at 3.8 TB/s, the step 11% faster (Llama-3.1-8B, 1x H200, BENCHMARKS.md
# "Decode roofline"). Below it the plain form was as fast or faster.
ROWS_LAST_DECODE_ROWS = 128


def _scale_rows(y: jax.Array, row_scale: jax.Array) -> jax.Array:
    """y: [B, T, ...] times row_scale [B, T, 1] (float32), rounded back to y's dtype."""
    scale = row_scale.reshape(row_scale.shape[:2] + (1,) * (y.ndim - 2))
    return (y.astype(jnp.float32) * scale).astype(y.dtype)


def layer_groups(params: Params) -> tuple[LayerGroup, ...]:
    """The layer weights as LayerGroups: a placed lane's own, or (checkpoint form, one chunk) one
    group assembled in the program."""
    if params.groups:
        return params.groups
    if len(params.chunks) != 1:
        raise ValueError(f"params of {len(params.chunks)} chunk slots without layer groups: place them "
                         f"with `plans.WeightStore`")
    return (group_of(list(params.chunks)),)


def place(params: Params) -> Params:
    """Checkpoint-form params (one chunk) in the placed form a lane runs: the layer weights as one
    LayerGroup, built once (`forward` would assemble it in every step)."""
    if params.groups:
        return params
    group = jax.jit(lambda p: fold_norms(layer_groups(p)[0], p.attn_norm, p.mlp_norm))(params)
    vocab = params.chunks[0].replace(**{n: None for n in CONTRACTED})
    return params.replace(chunks=(vocab,), groups=(group,))


def forward(params: Params, kv: KVCache, step: StepInput, cfg: LlamaConfig,
            layout: ChunkLayout = UNSPLIT, attention: str = "auto") -> tuple[jax.Array, KVCache]:
    """Run the new tokens of every sequence through the model, appending their K/V to the pages.

    One function covers prefill, chunked prefill (start_pos > 0, T > 1) and decode (T == 1).
    `attention`: the paged-attention implementation (`kernels.paged_attention`'s `impl`), chosen
    by whoever builds the step program (`Settings.attention`), so tracing reads no environment.
    The layer loop slices each layer out of the stacked weights by the loop counter (a
    `fori_loop`), which XLA folds into the gemms (dynamic-slice fusion), also for a group's first
    `used` chunks. Returns the final-norm hidden states [B, T, D] and the updated cache.
    """
    B, T = step.tokens.shape
    positions = step.start_pos[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    valid = jnp.arange(T)[None, :] < step.num_new[:, None]  # [B, T]
    inv_freq = rope_inv_freq(cfg)
    x = embed_tokens(params, step.tokens, layout)
    groups = layer_groups(params)
    q_heads = cfg.num_heads // layout.num_chunks  # per chunk; kv heads per chunk: the rest of wqkv / 2
    starts = np.cumsum([0] + [g.used for g in groups])
    if starts[-1] != layout.slots:
        raise ValueError(f"layer groups cover {starts[-1]} chunk positions; the layout has {layout.slots}")

    folded = {g.norms_folded for g in groups}
    if len(folded) != 1:
        raise ValueError("a lane's layer groups must all have their norms folded, or none")
    folded = folded.pop()
    impl = resolve_attention(attention)
    # Decode (one new token a row) on the kernel runs the fused decode kernel; its RoPE tables
    # are computed once for every layer.
    fused = T == 1 and impl in ("kernel", "interpret")
    rope = rope_rows(positions[:, 0], inv_freq, cfg.head_dim) if fused else None
    live = valid.astype(jnp.int32)  # converted once, not in every layer
    unit_rows = jnp.ones((B,), jnp.float32) if fused and not folded else None  # the kernel's row scale, unfolded
    # Unfolded, a layer's two norm weights are one slice [2, D] of one stacked buffer: XLA copies
    # the slice a norm fusion reads out first, and one copy a layer is cheaper than two.
    norms = None if folded else jnp.stack([params.attn_norm, params.mlp_norm], axis=1)  # [L, 2, D]

    def by_position(a):  # [B, T, tp, R, n, H] -> [B, T, R, tp x n, H]: the cache's order
        return a.transpose(0, 1, 3, 2, 4, 5).reshape(B, T, a.shape[3], -1, a.shape[5])

    def layer(i, carry):
        x, k_cache, v_cache = carry
        ws = [g.at_layer(i) for g in groups]
        norm = None if folded else jax.lax.dynamic_index_in_dim(norms, i, keepdims=False)  # [2, D]
        with jax.named_scope("attn"):
            if folded:  # the norm weights are in wqkv's rows: the gemm reads x, its rows scale by 1 / rms
                h, row_scale = x, rms_scale(x, cfg.norm_eps)  # [B, T, 1]
            else:
                h = rms_norm(x, norm[0], cfg.norm_eps)
            qkv = [_column_matmul(h, w.wqkv, "XH", 2 * j) for j, w in enumerate(ws)]
            qkv = qkv[0] if len(qkv) == 1 else jnp.concatenate(qkv, axis=3)  # [B, T, tp, R, X, H]
            tp, kv_heads = qkv.shape[2], (qkv.shape[4] - q_heads) // 2
            if fused:  # one new token a row: RoPE, KV write and attention in one kernel (which scales the rows)
                attn, k_cache, v_cache = decode_attention(qkv, rope, k_cache, v_cache, i, positions, live,
                                                          step.page_table, q_heads=q_heads,
                                                          row_scale=row_scale[:, 0, 0] if folded else unit_rows,
                                                          interpret=impl == "interpret")
            else:
                if folded:
                    qkv = _scale_rows(qkv, row_scale)
                q = by_position(qkv[:, :, :, :, :q_heads])
                k = by_position(qkv[:, :, :, :, q_heads:q_heads + kv_heads])
                v = by_position(qkv[:, :, :, :, q_heads + kv_heads:])
                q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
                k_cache, v_cache = write_kv_pages(k_cache, v_cache, i, k, v, positions, valid, step.page_table)
                attn = paged_attention(q, k_cache, v_cache, i, positions, step.page_table, impl=impl)
                attn = attn.reshape(B, T, -1, tp, q_heads, attn.shape[-1]).transpose(0, 1, 3, 2, 4, 5)  # [B, T, tp, R, N, H]
            out = sum(matmul("BTCRNH,CRNHD->BTD", attn[:, :, :, a:b], w.wo)
                      for a, b, w in zip(starts[:-1], starts[1:], ws))
            x = x + out
        with jax.named_scope("mlp"):
            if folded:
                h, row_scale = x, rms_scale(x, cfg.norm_eps)
            else:
                h = rms_norm(x, norm[1], cfg.norm_eps)
            out = None
            for j, w in enumerate(ws):
                gate_up = _column_matmul(h, w.w_gate_up, "GF", 2 * j + 1,  # [B, T, tp, R, 2, F]
                                         rows_last=T == 1 and B >= ROWS_LAST_DECODE_ROWS)
                if folded:  # fused into the silu-times-up kernel
                    gate_up = _scale_rows(gate_up, row_scale)
                part = matmul("BTCRF,CRFD->BTD", jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :], w.w_down)
                out = part if out is None else out + part
            x = x + out
        return x, k_cache, v_cache

    x, k_cache, v_cache = jax.lax.fori_loop(0, cfg.num_layers, layer, (x, kv.k, kv.v))
    return rms_norm(x, params.final_norm, cfg.norm_eps), KVCache(k=k_cache, v=v_cache)


MIN_LOGIT_ROWS = 8  # the LM head's rows at least (a gemm, not a gemv: `logits_from_hidden`)


def logits_from_hidden(params: Params, hidden: jax.Array, layout: ChunkLayout = UNSPLIT) -> jax.Array:
    """hidden: [..., D] -> fp32 logits [..., V]: a sum over the model-dim pieces of each slot.

    A single row is padded to `MIN_LOGIT_ROWS` rows first: as a vector-matrix product with
    float32 output, XLA on a GPU upcasts the whole LM head to float32 every step and runs a
    float32 gemv (1.5 ms of a 7.5 ms Llama-3.1-8B batch-1 step on an H200, BENCHMARKS.md, "Decode
    roofline"); with two or more rows it is the bf16 gemm of every other batch."""
    if hidden.ndim >= 1 and math.prod(hidden.shape[:-1]) == 1:
        rows = hidden.reshape(1, hidden.shape[-1])
        padded = jnp.concatenate([rows, jnp.zeros((MIN_LOGIT_ROWS - 1, hidden.shape[-1]), hidden.dtype)])
        return logits_from_hidden(params, padded, layout)[:1].reshape(*hidden.shape[:-1], -1)
    if layout.num_chunks > 1:
        hidden = hidden[..., layout.dim_order(hidden.shape[-1])]
    pieces = jnp.split(hidden, len(params.chunks), axis=-1)
    logits = None
    for h, c in zip(pieces, params.chunks):
        if c.lm_head is None:
            part = jnp.einsum("...D,VD->...V", h, c.embed, preferred_element_type=jnp.float32)
        else:
            part = jnp.einsum("...D,DV->...V", h, c.lm_head, preferred_element_type=jnp.float32)
        logits = part if logits is None else logits + part
    return logits


def last_hidden(hidden: jax.Array, num_new: jax.Array) -> jax.Array:
    """hidden: [B, T, D]; the state of each row's last valid token -> [B, D]."""
    idx = jnp.maximum(num_new - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
