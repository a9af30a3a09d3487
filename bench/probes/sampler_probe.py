"""Session 6 probe (BENCHMARKS.md, sampling): where the sampler program's time goes on one GPU, for
`llama-3.1-8b`'s vocabulary at batch 8 and 32 (temperature 0.8, top_p 0.95 on every row): the
whole `sample_rows` and its parts (argsort with indices, a sort of values alone, softmax, cumsum,
the categorical draw). Medians of 50 after warm-up.
    PYTHONPATH=. python bench/probes/sampler_probe.py
(on CPU: python bench/probes/sampler_probe.py --vocab 4096 --repeats 5)
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nitsum_jax.sampling import SamplingBatch, SamplingParams, _sortable, sample_rows, token_logprobs

ap = argparse.ArgumentParser()
ap.add_argument("--vocab", type=int, default=128256)
ap.add_argument("--batches", default="8,32")
ap.add_argument("--repeats", type=int, default=50)
args = ap.parse_args()
print(jax.devices()[0].device_kind)


def argsort_rows(logits, batch):
    """The draw shipped until session 6, for comparison: an argsort carrying the token ids, the
    cutoff applied in the sorted order, the draw over the sorted order mapped back."""
    is_greedy = batch.temperature < 1e-5
    scaled = logits / jnp.where(is_greedy, 1.0, batch.temperature)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    ordered = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    keep = (batch.top_k[:, None] <= 0) | (rank < batch.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, ordered, -jnp.inf), axis=-1)
    keep = keep & (jnp.cumsum(probs, axis=-1) - probs < batch.top_p[:, None])
    choice = jax.vmap(lambda seed, pos, row: jax.random.categorical(
        jax.random.fold_in(jax.random.key(seed), pos), row))(batch.seed, batch.position,
                                                             jnp.where(keep, ordered, -jnp.inf))
    drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    tokens = jnp.where(is_greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    return tokens, token_logprobs(logits, tokens)


def med_ms(fn, *xs):
    jax.block_until_ready(fn(*xs))
    ts = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*xs))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


for b in (int(x) for x in args.batches.split(",")):
    logits = jax.random.normal(jax.random.key(0), (b, args.vocab), jnp.float32) * 3
    batch = SamplingBatch.from_params([SamplingParams(temperature=0.8, top_p=0.95, seed=i) for i in range(b)],
                                      list(range(b)), [7] * b)
    batch = jax.tree.map(jnp.asarray, batch)
    key = jax.random.key(1)
    parts = {
        "sample_rows (as shipped)": (jax.jit(sample_rows), (logits, batch)),
        "argsort sampler (before)": (jax.jit(argsort_rows), (logits, batch)),
        "sort of uint32 keys": (jax.jit(lambda x: jnp.sort(_sortable(x), axis=-1)), (logits,)),
        "sort of uint32 keys + iota": (jax.jit(lambda x: jax.lax.sort(
            (_sortable(x), jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)), num_keys=1)), (logits,)),
        "argsort (values + indices)": (jax.jit(lambda x: jnp.argsort(-x, axis=-1)), (logits,)),
        "sort of values alone": (jax.jit(lambda x: jnp.sort(x, axis=-1)), (logits,)),
        "softmax": (jax.jit(lambda x: jax.nn.softmax(x, axis=-1)), (logits,)),
        "cumsum": (jax.jit(lambda x: jnp.cumsum(x, axis=-1)), (logits,)),
        "categorical draw": (jax.jit(lambda x: jax.random.categorical(key, x, axis=-1)), (logits,)),
        "argmax": (jax.jit(lambda x: jnp.argmax(x, axis=-1)), (logits,)),
        "empty program (dispatch)": (jax.jit(lambda x: x[:, 0]), (logits,)),
    }
    for name, (fn, xs) in parts.items():
        print(f"batch {b:3d}  {name:28s} {med_ms(fn, *xs):7.3f} ms", flush=True)
    tokens, _ = jax.jit(sample_rows)(logits, batch)
    print(f"batch {b:3d}  tokens in range: {bool(np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < args.vocab)))}")
