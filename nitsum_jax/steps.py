"""The jitted model steps. The KV cache is donated to every step (`donate_argnames="kv"`), so
XLA updates the pages in place instead of copying the whole cache each token. `attention` (static)
is the paged-attention implementation, chosen when the program is built (`Settings.attention`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nitsum_jax.attention import KVCache
from nitsum_jax.config import LlamaConfig
from nitsum_jax.model import UNSPLIT, ChunkLayout, Params, StepInput, forward, last_hidden, logits_from_hidden
from nitsum_jax.sampling import SamplingBatch, sample, token_logprobs


@functools.partial(jax.jit, static_argnames=("cfg", "layout", "attention"), donate_argnames=("kv",))
def step_logits(params: Params, kv: KVCache, step: StepInput, cfg: LlamaConfig,
                layout: ChunkLayout = UNSPLIT, attention: str = "auto") -> tuple[jax.Array, KVCache]:
    """Logits of every new token: [B, T, V] float32 (scoring, parity checks)."""
    hidden, kv = forward(params, kv, step, cfg, layout, attention)
    return logits_from_hidden(params, hidden, layout), kv


def sample_step(params: Params, kv: KVCache, step: StepInput, sampling: SamplingBatch, cfg: LlamaConfig,
                layout: ChunkLayout = UNSPLIT, attention: str = "auto") -> tuple[jax.Array, KVCache]:
    """Append the new tokens, then draw each row's next token.

    Returns tokens [B] int32, their log-probabilities [B] float32 (under the untempered model:
    what teacher-forced NLL checks compare) and the cache. Unjitted: lanes compile it ahead of
    time for their own meshes (`plans`)."""
    hidden, kv = forward(params, kv, step, cfg, layout, attention)
    logits = logits_from_hidden(params, last_hidden(hidden, step.num_new), layout)
    tokens = sample(logits, sampling)
    return tokens, token_logprobs(logits, tokens), kv


def greedy_step(params: Params, kv: KVCache, step: StepInput, cfg: LlamaConfig,
                layout: ChunkLayout = UNSPLIT,
                attention: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array, KVCache]:
    """A serving lane's step: append the new tokens, then each row's greedy token, its
    log-probability and the logits of its last position ([B] int32, [B] float32, [B, V] float32)
    and the cache. The lane draws non-greedy rows from the logits in a second program
    (`sampling.sample_rows`) only when the batch has some, so the step itself has no
    data-dependent branch: on GPU a conditional makes the thread that launches the step wait
    for the device to reach it (BENCHMARKS.md, "Engine host path": without it a TP2 serving step was
    9% shorter, a busy TP1 lane's 20%)."""
    hidden, kv = forward(params, kv, step, cfg, layout, attention)
    logits = logits_from_hidden(params, last_hidden(hidden, step.num_new), layout)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, token_logprobs(logits, tokens), logits, kv


step_sample = jax.jit(sample_step, static_argnames=("cfg", "layout", "attention"), donate_argnames=("kv",))
