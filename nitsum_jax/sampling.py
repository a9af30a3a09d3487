"""Token sampling on the device (batched, per-row parameters).

Each row draws with the key `fold_in(key(seed), position)`, so a request with a given seed
gets the same tokens whatever else shares its batch, lane or plan.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# The host-side parameters live in `sampling_params` (no JAX: the engine core and the simulator
# read them); they are re-exported here.
from nitsum_jax.sampling_params import (GREEDY_BELOW, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS,  # noqa: F401
                                        MAX_STOP_TOKEN_IDS, SamplingError, SamplingParams)


@struct.dataclass
class SamplingBatch:
    """Per-row sampling parameters as device arrays, one row per batch slot."""

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32
    seed: jax.Array  # [B] uint32
    position: jax.Array  # [B] int32, index of the token being drawn (keys the draw)

    @staticmethod
    def from_params(params: Sequence[SamplingParams | None], seeds: Sequence[int],
                    positions: Sequence[int]) -> "SamplingBatch":
        rows = [p or SamplingParams() for p in params]
        return SamplingBatch(
            temperature=np.array([p.temperature for p in rows], np.float32),
            top_k=np.array([p.top_k for p in rows], np.int32),
            top_p=np.array([p.top_p for p in rows], np.float32),
            seed=np.array(seeds, np.uint32),
            position=np.array(positions, np.int32),
        )


def sample(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """logits: [B, V] float32 -> next token ids [B] int32 (greedy rows: argmax; others: drawn).

    A batch whose rows are all greedy skips the sort over the vocabulary (`lax.cond`). On GPU a
    conditional makes the host wait for the device mid-program, so the serving lanes do not use
    this: their step draws greedy tokens only, and `sample_rows` runs after it when the host
    knows a row samples (`draws`)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Temperatures this small would overflow logits / t to inf (NaN after softmax): treat as greedy.
    is_greedy = batch.temperature < GREEDY_BELOW
    return jax.lax.cond(jnp.all(is_greedy), lambda: greedy, lambda: _mixed(logits, batch, greedy, is_greedy))


def draws(batch: SamplingBatch | None) -> bool:
    """On the host: does any row of this batch (numpy arrays; None: all greedy) sample instead of
    taking the argmax?"""
    return batch is not None and bool(np.any(np.asarray(batch.temperature) >= GREEDY_BELOW))


def sample_rows(logits: jax.Array, batch: SamplingBatch,
                greedy: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Every row's token (greedy rows: argmax; others: drawn) and its log-probability under the
    untempered model: ([B] int32, [B] float32). No control flow: the program always sorts.
    `greedy`: the rows' argmax when the caller has it already (a lane's step returns it)."""
    is_greedy = batch.temperature < GREEDY_BELOW
    if greedy is None:
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = _mixed(logits, batch, greedy, is_greedy)
    return tokens, token_logprobs(logits, tokens)


def _mixed(logits: jax.Array, batch: SamplingBatch, greedy: jax.Array, is_greedy: jax.Array) -> jax.Array:
    return jnp.where(is_greedy, greedy, _draw(logits, batch, is_greedy))


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[tokens] per row: [B] float32."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]


def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (XLA sorts plain integers faster than floats,
    whose comparator must order NaNs)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _unsortable(keys: jax.Array) -> jax.Array:
    bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _draw(logits: jax.Array, batch: SamplingBatch, is_greedy: jax.Array) -> jax.Array:
    """Temperature, top-k and top-p draws for every row: [B] int32.

    Each row's values are sorted (as uint32 keys, without their token ids) only to find its
    cutoff: the smallest value among the top-k that is inside the smallest prefix whose mass
    reaches top_p. The draw is then over the whole vocabulary with the logits below the cutoff
    masked (tokens tied with the cutoff value stay). Measured on an H100 at batch 32 over a
    128k vocabulary (BENCHMARKS.md, "Sampler"): 0.89 ms against 1.84 ms for an argsort that
    carries the token ids."""
    temp = jnp.where(is_greedy, 1.0, batch.temperature)
    scaled = logits / temp[:, None]
    desc = _unsortable(~jnp.sort(~_sortable(scaled), axis=-1))  # [B, V] values, largest first
    rank = jnp.arange(logits.shape[-1])[None, :]
    keep = (batch.top_k[:, None] <= 0) | (rank < batch.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, desc, -jnp.inf), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first value always stays).
    keep = keep & (jnp.cumsum(probs, axis=-1) - probs < batch.top_p[:, None])
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1)
    masked = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)

    def draw(seed, position, row_logits):
        key = jax.random.fold_in(jax.random.key(seed), position)
        return jax.random.categorical(key, row_logits)

    return jax.vmap(draw)(batch.seed, batch.position, masked).astype(jnp.int32)
