"""Single-lane generation: a small continuous-batching loop over one device's paged cache.

This is what `nitsum-jax generate` runs. Shapes come from fixed bucket grids, so the number
of compiled programs is bounded and known: prefill chunks of `prefill_chunk` tokens for one
sequence, decode steps over a power-of-two batch; page tables padded to a power of two.
"""

from __future__ import annotations

import random
from typing import Sequence as Seq

import jax
import numpy as np

from nitsum_jax.config import LlamaConfig
from nitsum_jax.kv import PageAllocator, allocate_kv_cache
from nitsum_jax.model import Params, StepInput
from nitsum_jax.sampling import SamplingBatch, SamplingParams
from nitsum_jax.sequence import Completion, RequestError, Sequence, append_token, validate_prompt
from nitsum_jax.steps import step_sample
from nitsum_jax.tokenizer import TextTokenizer


def pow2_bucket(n: int, limit: int) -> int:
    """Smallest power of two >= n, refusing sizes past `limit` (a shape outside the grid)."""
    b = 1
    while b < n:
        b *= 2
    if b > limit:
        raise ValueError(f"size {n} is outside the compiled grid (largest bucket {limit})")
    return b


class Generator:
    """Runs requests to completion on one device (or the default device)."""

    def __init__(self, cfg: LlamaConfig, params: Params, tokenizer: TextTokenizer | None = None, *,
                 num_pages: int | None = None, page_size: int = 16, max_batch: int = 16,
                 prefill_chunk: int = 64, max_seq_len: int | None = None):
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        self.page_size = page_size
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.max_pages_per_seq = pow2_bucket(-(-self.max_seq_len // page_size), 1 << 30)
        if num_pages is None:
            num_pages = max_batch * -(-self.max_seq_len // page_size)
        self.allocator = PageAllocator(num_pages, page_size)
        self.kv = allocate_kv_cache(cfg, num_pages, page_size)

    # -- public --------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt is text but this model has no tokenizer; give token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: Seq[str | Seq[int]],
                 sampling: SamplingParams | Seq[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Generate for every prompt (text or token ids); blocks until all are done."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        seqs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
            ids = self.encode(prompt)
            validate_prompt(ids, params, self.cfg.vocab_size, self.max_seq_len)
            seed = params.seed if params.seed is not None else random.getrandbits(32)
            seqs.append(Sequence(seq_id=i, prompt_ids=ids, params=params, seed=seed))
        waiting = list(seqs)
        running: list[Sequence] = []
        while waiting or running:
            while waiting and len(running) < self.max_batch and self.allocator.can_reserve(
                    waiting[0].max_total_len):
                seq = waiting.pop(0)
                self.allocator.reserve(seq.seq_id, seq.max_total_len)
                self._prefill(seq)
                running.append(seq)
            if not running:
                raise RequestError(f"request needs {self.allocator.pages_for(waiting[0].max_total_len)} KV pages "
                                   f"but the cache has {self.allocator.num_pages}")
            ready = [s for s in running if not s.finished]
            if ready:
                self._decode(ready)
            for seq in [s for s in running if s.finished]:
                self.allocator.free(seq.seq_id)
                running.remove(seq)
        return [s.completion() for s in seqs]

    # -- steps ---------------------------------------------------------------------------
    def _run(self, rows: list[Sequence], tokens: np.ndarray, num_new: np.ndarray) -> np.ndarray:
        """One step over `rows` (padded to the batch bucket); returns sampled tokens [len(rows)]."""
        batch = tokens.shape[0]
        pad = batch - len(rows)
        ids = [s.seq_id for s in rows] + [None] * pad
        need = max(self.allocator.pages_for(s.num_cached + int(n)) for s, n in zip(rows, num_new))
        pages = pow2_bucket(need, self.max_pages_per_seq)
        start = np.array([s.num_cached for s in rows] + [0] * pad, np.int32)
        step = StepInput(tokens=tokens, start_pos=start, num_new=num_new,
                         page_table=self.allocator.page_table(ids, pages))
        positions = [s.num_cached + int(n) for s, n in zip(rows, num_new)] + [0] * pad
        sampling = SamplingBatch.from_params([s.params for s in rows] + [None] * pad,
                                             [s.seed for s in rows] + [0] * pad, positions)
        next_tokens, self.kv = step_sample(self.params, self.kv, step, sampling, self.cfg)
        return np.asarray(jax.device_get(next_tokens))[:len(rows)]

    def _prefill(self, seq: Sequence) -> None:
        ids = seq.prompt_ids
        while seq.num_cached < len(ids):
            chunk = ids[seq.num_cached:seq.num_cached + self.prefill_chunk]
            tokens = np.zeros((1, pow2_bucket(len(chunk), self.prefill_chunk)), np.int32)
            tokens[0, :len(chunk)] = chunk
            token = self._run([seq], tokens, np.array([len(chunk)], np.int32))[0]
            seq.num_cached += len(chunk)
        append_token(seq, int(token), self.tokenizer, self.cfg.eos_token_ids)

    def _decode(self, rows: list[Sequence]) -> None:
        batch = pow2_bucket(len(rows), pow2_bucket(self.max_batch, 1 << 30))
        tokens = np.zeros((batch, 1), np.int32)
        tokens[:len(rows), 0] = [s.output_ids[-1] for s in rows]
        num_new = np.array([1] * len(rows) + [0] * (batch - len(rows)), np.int32)
        sampled = self._run(rows, tokens, num_new)
        for seq, token in zip(rows, sampled):
            seq.num_cached += 1
            append_token(seq, int(token), self.tokenizer, self.cfg.eos_token_ids)
