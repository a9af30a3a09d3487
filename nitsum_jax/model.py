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

from nitsum_jax.attention import KVCache, paged_attention_reference, write_kv_pages
from nitsum_jax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    """One weight, abstractly: shape, logical axis names and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (scaled by fan-in) or "ones"
    fan_in: int = 1


@struct.dataclass
class LayerWeights:
    attn_norm: jax.Array  # [layers, dim]
    wq: jax.Array  # [layers, dim, heads, head_dim]
    wk: jax.Array  # [layers, dim, kv_heads, head_dim]
    wv: jax.Array  # [layers, dim, kv_heads, head_dim]
    wo: jax.Array  # [layers, heads, head_dim, dim]
    mlp_norm: jax.Array  # [layers, dim]
    w_gate: jax.Array  # [layers, dim, ffn]
    w_up: jax.Array  # [layers, dim, ffn]
    w_down: jax.Array  # [layers, ffn, dim]


@struct.dataclass
class Params:
    embed: jax.Array  # [vocab, dim]
    layers: LayerWeights
    final_norm: jax.Array  # [dim]
    lm_head: jax.Array | None  # [dim, vocab]; None when tied to `embed`


def declare(cfg: LlamaConfig) -> Params:
    """The single declaration of every weight of `cfg` (leaves are `ParamDecl`)."""
    L, D, N, K, H, F, V = (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.ffn_dim, cfg.vocab_size)
    layers = LayerWeights(
        attn_norm=ParamDecl((L, D), ("layers", None), "ones"),
        wq=ParamDecl((L, D, N, H), ("layers", "embed", "heads", None), fan_in=D),
        wk=ParamDecl((L, D, K, H), ("layers", "embed", "kv_heads", None), fan_in=D),
        wv=ParamDecl((L, D, K, H), ("layers", "embed", "kv_heads", None), fan_in=D),
        wo=ParamDecl((L, N, H, D), ("layers", "heads", None, "embed"), fan_in=N * H),
        mlp_norm=ParamDecl((L, D), ("layers", None), "ones"),
        w_gate=ParamDecl((L, D, F), ("layers", "embed", "ffn"), fan_in=D),
        w_up=ParamDecl((L, D, F), ("layers", "embed", "ffn"), fan_in=D),
        w_down=ParamDecl((L, F, D), ("layers", "ffn", "embed"), fan_in=F),
    )
    return Params(
        embed=ParamDecl((V, D), ("vocab", "embed"), fan_in=1),
        layers=layers,
        final_norm=ParamDecl((D,), (None,), "ones"),
        lm_head=None if cfg.tie_embeddings else ParamDecl((D, V), ("embed", "vocab"), fan_in=D),
    )


def _is_decl(x) -> bool:
    return isinstance(x, ParamDecl)


def map_decls(fn: Callable[[ParamDecl], object], decls: Params) -> Params:
    return jax.tree.map(fn, decls, is_leaf=_is_decl)


def abstract_params(cfg: LlamaConfig, shardings: Params | None = None) -> Params:
    """`ShapeDtypeStruct` tree (optionally carrying shardings) for `eval_shape`/Orbax restore."""
    decls = declare(cfg)
    if shardings is None:
        return map_decls(lambda d: jax.ShapeDtypeStruct(d.shape, cfg.jnp_dtype), decls)
    return jax.tree.map(lambda d, s: jax.ShapeDtypeStruct(d.shape, cfg.jnp_dtype, sharding=s), decls, shardings,
                        is_leaf=_is_decl)


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
    """Random weights (normal, std 1/sqrt(fan_in)); norms start at one."""
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


# Megatron-style tensor parallelism: heads and ffn columns are split over `tp`; the model dim
# stays whole so each layer needs one all-reduce after attention and one after the MLP.
TP_RULES = ShardingRules((("heads", "tp"), ("kv_heads", "tp"), ("ffn", "tp"), ("vocab", "tp")))


def param_specs(cfg: LlamaConfig, rules: ShardingRules = TP_RULES) -> Params:
    return map_decls(lambda d: rules.spec(d.axes), declare(cfg))


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


@struct.dataclass
class StepInput:
    """What one model step needs besides weights and cache. Arrays only; shapes are the bucket."""

    tokens: jax.Array  # [B, T] int32, new tokens (padded)
    start_pos: jax.Array  # [B] int32, cache length before this step
    num_new: jax.Array  # [B] int32, valid entries of `tokens` per row (0 = idle slot)
    page_table: jax.Array  # [B, pages_per_seq] int32, page ids of each sequence


def forward(params: Params, kv: KVCache, step: StepInput, cfg: LlamaConfig) -> tuple[jax.Array, KVCache]:
    """Run the new tokens of every sequence through the model, appending their K/V to the pages.

    One function covers prefill, chunked prefill (start_pos > 0, T > 1) and decode (T == 1).
    Returns the final-norm hidden states [B, T, D] and the updated cache.
    """
    B, T = step.tokens.shape
    positions = step.start_pos[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    valid = jnp.arange(T)[None, :] < step.num_new[:, None]  # [B, T]
    inv_freq = rope_inv_freq(cfg)
    x = jnp.take(params.embed, step.tokens, axis=0)  # [B, T, D]

    def layer(carry, xs):
        x, k_cache, v_cache = carry
        w, layer_idx = xs
        with jax.named_scope("attn"):
            h = rms_norm(x, w.attn_norm, cfg.norm_eps)
            q = jnp.einsum("BTD,DNH->BTNH", h, w.wq)
            k = jnp.einsum("BTD,DKH->BTKH", h, w.wk)
            v = jnp.einsum("BTD,DKH->BTKH", h, w.wv)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
            k_cache, v_cache = write_kv_pages(k_cache, v_cache, layer_idx, k, v, positions, valid,
                                              step.page_table)
            attn = paged_attention_reference(q, k_cache, v_cache, layer_idx, positions, step.page_table)
            x = x + jnp.einsum("BTNH,NHD->BTD", attn, w.wo)
        with jax.named_scope("mlp"):
            h = rms_norm(x, w.mlp_norm, cfg.norm_eps)
            gate = jnp.einsum("BTD,DF->BTF", h, w.w_gate)
            up = jnp.einsum("BTD,DF->BTF", h, w.w_up)
            x = x + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w.w_down)
        return (x, k_cache, v_cache), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, k_cache, v_cache), _ = jax.lax.scan(layer, (x, kv.k, kv.v), (params.layers, layer_ids))
    return rms_norm(x, params.final_norm, cfg.norm_eps), KVCache(k=k_cache, v=v_cache)


def logits_from_hidden(params: Params, hidden: jax.Array) -> jax.Array:
    """hidden: [..., D] -> fp32 logits [..., V]."""
    if params.lm_head is None:
        return jnp.einsum("...D,VD->...V", hidden, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("...D,DV->...V", hidden, params.lm_head, preferred_element_type=jnp.float32)


def last_hidden(hidden: jax.Array, num_new: jax.Array) -> jax.Array:
    """hidden: [B, T, D]; the state of each row's last valid token -> [B, D]."""
    idx = jnp.maximum(num_new - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
