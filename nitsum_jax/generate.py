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
from nitsum_jax.model import Params, StepInput, place
from nitsum_jax.sampling import SamplingBatch, SamplingParams
from nitsum_jax.sequence import Completion, RequestError, Sequence, append_token, validate_prompt
from nitsum_jax.settings import settings
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


class LocalRunner:
    """Steps on the default device with `jit` (compiles lazily, per power-of-two bucket).
    Lanes (`nitsum_jax.plans.Lane`) offer the same interface with ahead-of-time programs."""

    def __init__(self, cfg: LlamaConfig, params: Params, num_pages: int, page_size: int, max_batch: int,
                 prefill_chunk: int, max_seq_len: int):
        self.cfg, self.params = cfg, place(params)  # the layer weights as one group, built once
        self.allocator = PageAllocator(num_pages, page_size)
        self.kv = allocate_kv_cache(cfg, num_pages, page_size)
        self.max_batch, self.prefill_chunk = pow2_bucket(max_batch, 1 << 30), prefill_chunk
        self.pages_per_seq = pow2_bucket(-(-max_seq_len // page_size), 1 << 30)
        self.attention = settings().attention  # chosen now: tracing a step reads no environment

    def batch_for(self, n: int) -> int:
        return pow2_bucket(n, self.max_batch)

    def prefill_for(self, n: int) -> int:
        return pow2_bucket(n, self.prefill_chunk)

    def step(self, tokens, start_pos, num_new, page_table, sampling):
        step = StepInput(tokens=tokens, start_pos=start_pos, num_new=num_new, page_table=page_table)
        next_tokens, logprobs, self.kv = step_sample(self.params, self.kv, step, sampling, self.cfg,
                                                     attention=self.attention)
        return jax.device_get((next_tokens, logprobs))


class Generator:
    """Runs requests to completion on one runner: the default device, or a lane of a plan."""

    def __init__(self, cfg: LlamaConfig, params: Params | None = None, tokenizer: TextTokenizer | None = None, *,
                 num_pages: int | None = None, page_size: int = 16, max_batch: int = 16,
                 prefill_chunk: int = 64, max_seq_len: int | None = None, runner=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        if runner is None:
            if num_pages is None:
                num_pages = max_batch * -(-self.max_seq_len // page_size)
            runner = LocalRunner(cfg, params, num_pages, page_size, max_batch, prefill_chunk, self.max_seq_len)
        self.runner = runner

    @property
    def allocator(self) -> PageAllocator:
        return self.runner.allocator

    # -- public --------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt is text but this model has no tokenizer; give token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def new_sequence(self, seq_id, prompt: str | Seq[int], params: SamplingParams) -> Sequence:
        ids = self.encode(prompt)
        validate_prompt(ids, params, self.cfg.vocab_size, self.max_seq_len)
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        return Sequence(seq_id=seq_id, prompt_ids=ids, params=params, seed=seed)

    def generate(self, prompts: Seq[str | Seq[int]],
                 sampling: SamplingParams | Seq[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Generate for every prompt (text or token ids); blocks until all are done."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        seqs = [self.new_sequence(i, prompt, params)
                for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True))]
        waiting = list(seqs)
        running: list[Sequence] = []
        while waiting or running:
            while waiting and len(running) < self.max_batch and self.allocator.can_reserve(
                    waiting[0].max_total_len):
                seq = waiting.pop(0)
                self.allocator.reserve(seq.seq_id, seq.max_total_len)
                self.prefill(seq)
                running.append(seq)
            if not running:
                raise RequestError(f"request needs {self.allocator.pages_for(waiting[0].max_total_len)} KV pages "
                                   f"but the cache has {self.allocator.num_pages}")
            ready = [s for s in running if not s.finished]
            if ready:
                self.decode(ready)
            for seq in [s for s in running if s.finished]:
                self.allocator.free(seq.seq_id)
                running.remove(seq)
        return [s.completion() for s in seqs]

    # -- steps (pages must already be reserved) -----------------------------------------
    def _run(self, rows: list[Sequence], tokens: np.ndarray, num_new: np.ndarray):
        """One step over `rows` (padded to the batch bucket); tokens and logprobs [len(rows)]."""
        batch = tokens.shape[0]
        pad = batch - len(rows)
        ids = [s.seq_id for s in rows] + [None] * pad
        start = np.array([s.num_cached for s in rows] + [0] * pad, np.int32)
        positions = [s.num_cached + int(n) for s, n in zip(rows, num_new)] + [0] * pad
        sampling = SamplingBatch.from_params([s.params for s in rows] + [None] * pad,
                                             [s.seed for s in rows] + [0] * pad, positions)
        page_table = self.allocator.page_table(ids, self.runner.pages_per_seq)
        next_tokens, logprobs = self.runner.step(tokens, start, num_new, page_table, sampling)
        return next_tokens[:len(rows)], logprobs[:len(rows)]

    def prefill(self, seq: Sequence) -> None:
        """Run the prompt (in chunks) and draw the first token."""
        ids = seq.prompt_ids
        while seq.num_cached < len(ids):
            chunk = ids[seq.num_cached:seq.num_cached + self.prefill_chunk]
            tokens = np.zeros((1, self.runner.prefill_for(len(chunk))), np.int32)
            tokens[0, :len(chunk)] = chunk
            token, logprob = self._run([seq], tokens, np.array([len(chunk)], np.int32))
            seq.num_cached += len(chunk)
        seq.output_logprobs.append(float(logprob[0]))
        append_token(seq, int(token[0]), self.tokenizer, self.cfg.eos_token_ids)

    def decode(self, rows: list[Sequence]) -> None:
        """One decode step for every row: each gets its next token."""
        batch = self.runner.batch_for(len(rows))
        tokens = np.zeros((batch, 1), np.int32)
        tokens[:len(rows), 0] = [s.output_ids[-1] for s in rows]
        num_new = np.array([1] * len(rows) + [0] * (batch - len(rows)), np.int32)
        sampled, logprobs = self._run(rows, tokens, num_new)
        for seq, token, logprob in zip(rows, sampled, logprobs):
            seq.num_cached += 1
            seq.output_logprobs.append(float(logprob))
            append_token(seq, int(token), self.tokenizer, self.cfg.eos_token_ids)
