"""A lane's step on its devices: the host arrays of one step program (tokens, positions, page
table, sampling) built from the core's work, dispatched to the lane's compiled programs."""

from __future__ import annotations

import jax
import numpy as np

from nitsum_jax.plans import Lane
from nitsum_jax.sampling import SamplingBatch
from nitsum_jax.scheduler import Work
from nitsum_jax.sequence import Sequence


def dispatch_work(lane: Lane, work: list[Work], seqs: dict[str, Sequence], max_decode_batch: int,
                  sampled: dict[str, int]) -> list[tuple[list[Work], object]]:
    """Decode-shaped rows (one token) in batches of at most `max_decode_batch`, prefill chunks
    one by one. Returns [(rows, pending device outputs)]. `sampled[lane]` counts programs that
    carried a sampled row."""
    singles = [w for w in work if w.num_tokens == 1]
    chunks = [w for w in work if w.num_tokens > 1]
    out = []
    for i in range(0, len(singles), max_decode_batch):
        rows = singles[i:i + max_decode_batch]
        out.append((rows, run_rows(lane, rows, seqs, lane.batch_for(len(rows)), 1, sampled)))
    for w in chunks:
        out.append(([w], run_rows(lane, [w], seqs, 1, lane.prefill_for(w.num_tokens), sampled)))
    return out


def run_rows(lane: Lane, rows: list[Work], seqs: dict[str, Sequence], batch: int, width: int,
             sampled: dict[str, int], feed: jax.Array | None = None):
    """Enqueue one step program; `feed`: the previous step's output tokens on the device, in
    `rows` order (a chained decode step), instead of tokens read from the host."""
    tokens = np.zeros((batch, width), np.int32) if feed is None else None  # [batch, width]
    start = np.zeros(batch, np.int32)  # [batch] cache length before the step
    num_new = np.zeros(batch, np.int32)  # [batch] valid tokens per row (0: idle slot)
    row_seqs = [seqs[w.request.request_id] for w in rows]
    for i, (w, seq) in enumerate(zip(rows, row_seqs)):
        if feed is None:
            tokens[i, :w.num_tokens] = seq.all_ids[w.start_pos:w.start_pos + w.num_tokens]
        start[i], num_new[i] = w.start_pos, w.num_tokens
    ids = [w.request.request_id for w in rows] + [None] * (batch - len(rows))
    table = lane.allocator.page_table(ids, lane.pages_per_seq)  # [batch, pages_per_seq]
    sampling = None  # all greedy: the step's argmax is every row's token
    if not all(seq.params.greedy for seq in row_seqs):
        pad = batch - len(rows)
        sampling = SamplingBatch.from_params([s.params for s in row_seqs] + [None] * pad,
                                             [s.seed for s in row_seqs] + [0] * pad,
                                             [w.start_pos + w.num_tokens for w in rows] + [0] * pad)
        sampled[lane.name] += 1
    if feed is not None:
        return lane.dispatch_fed(feed, start, num_new, table, sampling)
    return lane.dispatch(tokens, start, num_new, table, sampling)


def host_results(pending: list[tuple[list[Work], object]]) -> list[tuple[list[Work], list[int], list[float]]]:
    """Wait for a step's programs and read their tokens and logprobs as Python scalars."""
    outputs = jax.device_get([p for _, p in pending])
    return [(rows, tokens.tolist(), logprobs.tolist()) for (rows, _), (tokens, logprobs) in zip(pending, outputs)]
