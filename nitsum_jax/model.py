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
from nitsum_jax.config import LlamaConfig
from nitsum_jax.quant import CONTRACTED, Fp8Weight, check_format, matmul, quantize_params, scale_shape


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
    # A lane's placed weights hold q, k and v as one buffer (`fuse_qkv`), so that a step reads them
    # with one gemm: [layers, dim, tp, heads/C + 2 x kv heads/C, head_dim] (the device's chunk on
    # axis 2); wq, wk and wv are then None. Checkpoints and `declare` keep them apart.
    wqkv: jax.Array | Fp8Weight | None = None


def fuse_qkv(chunk: ChunkWeights) -> ChunkWeights:
    """One device's chunk with wq, wk and wv concatenated into `wqkv` ([layers, dim, 1, q + 2 kv
    heads, head_dim]; an fp8 weight's values and scales alike); unfused already: unchanged."""
    if chunk.wq is None:
        return chunk

    def cat(q, k, v):
        return jnp.concatenate([q, k, v], axis=2)[:, :, None]

    fused = jax.tree.map(cat, chunk.wq, chunk.wk, chunk.wv)
    return chunk.replace(wq=None, wk=None, wv=None, wqkv=fused)


@struct.dataclass
class Params:
    attn_norm: jax.Array  # [layers, dim]
    mlp_norm: jax.Array  # [layers, dim]
    final_norm: jax.Array  # [dim]
    chunks: tuple[ChunkWeights, ...]  # R chunk slots


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
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


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
    """x: [B, T, heads, H]; positions: [B, T]. Half-split rotation (the HF weight layout)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
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
    would concatenate their weights (gate+up, q+k+v, and the chunk slots) into a new buffer on
    every step, measured at 7.5 ms of a 21 ms Llama-3.1-8B TP1 step on an H100 (BENCHMARKS.md)."""
    return jax.lax.optimization_barrier((h, jnp.int32(tag)))[0]


def _split_qkv(qkv: jax.Array, q_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, T, tp, q + 2 kv heads, H] -> q [B, T, tp x q, H], k and v [B, T, tp x kv, H], heads in
    the order of the devices' chunks (as wq, wk and wv shard them)."""
    B, T, C, X, H = qkv.shape
    kv_heads = (X - q_heads) // 2
    parts = qkv[:, :, :, :q_heads], qkv[:, :, :, q_heads:q_heads + kv_heads], qkv[:, :, :, q_heads + kv_heads:]
    return tuple(p.reshape(B, T, C * p.shape[3], H) for p in parts)


def forward(params: Params, kv: KVCache, step: StepInput, cfg: LlamaConfig,
            layout: ChunkLayout = UNSPLIT, attention: str = "auto") -> tuple[jax.Array, KVCache]:
    """Run the new tokens of every sequence through the model, appending their K/V to the pages.

    One function covers prefill, chunked prefill (start_pos > 0, T > 1) and decode (T == 1).
    `attention`: the paged-attention implementation (`kernels.paged_attention`'s `impl`), chosen
    by whoever builds the step program (`Settings.attention`), so tracing reads no environment.
    Returns the final-norm hidden states [B, T, D] and the updated cache.
    """
    B, T = step.tokens.shape
    positions = step.start_pos[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    valid = jnp.arange(T)[None, :] < step.num_new[:, None]  # [B, T]
    inv_freq = rope_inv_freq(cfg)
    x = embed_tokens(params, step.tokens, layout)
    layer_weights = tuple(c.replace(embed=None, lm_head=None) for c in params.chunks)

    def layer(carry, xs):
        x, k_slots, v_slots = carry
        attn_norm, mlp_norm, chunks, layer_idx = xs
        k_slots, v_slots = list(k_slots), list(v_slots)
        with jax.named_scope("attn"):
            h = rms_norm(x, attn_norm, cfg.norm_eps)
            out = jnp.zeros_like(x)
            for r, w in enumerate(chunks):
                if w.wqkv is not None:  # one gemm for the three (a lane's placed weights)
                    q, k, v = _split_qkv(matmul("BTD,DCXH->BTCXH", _own(h, 3 * r), w.wqkv),
                                         cfg.num_heads // layout.num_chunks)
                else:
                    q = matmul("BTD,DNH->BTNH", _own(h, 3 * r), w.wq)
                    k = matmul("BTD,DKH->BTKH", _own(h, 3 * r + 1), w.wk)
                    v = matmul("BTD,DKH->BTKH", _own(h, 3 * r + 2), w.wv)
                q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
                k_slots[r], v_slots[r] = write_kv_pages(k_slots[r], v_slots[r], layer_idx, k, v, positions,
                                                        valid, step.page_table)
                attn = paged_attention(q, k_slots[r], v_slots[r], layer_idx, positions, step.page_table,
                                       impl=attention)
                out = out + matmul("BTNH,NHD->BTD", attn, w.wo)
            x = x + out
        with jax.named_scope("mlp"):
            h = rms_norm(x, mlp_norm, cfg.norm_eps)
            out = jnp.zeros_like(x)
            for r, w in enumerate(chunks):
                gate = matmul("BTD,DF->BTF", _own(h, 2 * r), w.w_gate)
                up = matmul("BTD,DF->BTF", _own(h, 2 * r + 1), w.w_up)
                out = out + matmul("BTF,FD->BTD", jax.nn.silu(gate) * up, w.w_down)
            x = x + out
        return (x, tuple(k_slots), tuple(v_slots)), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, k_slots, v_slots), _ = jax.lax.scan(
        layer, (x, tuple(kv.k), tuple(kv.v)), (params.attn_norm, params.mlp_norm, layer_weights, layer_ids))
    return rms_norm(x, params.final_norm, cfg.norm_eps), KVCache(k=k_slots, v=v_slots)


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
