"""A request's life on the host: its tokens, sampling parameters, stop rules and result."""

from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

from nitsum_jax.sampling_params import SamplingParams
from nitsum_jax.tokenizer import TextTokenizer


class RequestError(ValueError):
    """A request is malformed (names the field, the value and the limit)."""


@dataclasses.dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    logprobs: list[float] = dataclasses.field(default_factory=list)  # of each token, untempered


@dataclasses.dataclass
class Sequence:
    seq_id: object
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the pages
    finish_reason: str | None = None
    final_text: str | None = None  # set when the sequence finishes (stop strings cut off)
    _decoder: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str | None:
        """The generated text: final once finished, else what the incremental decoder has so far
        (None without a tokenizer)."""
        if self.final_text is not None:
            return self.final_text
        return self._decoder.text if self._decoder is not None else None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_len(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> Completion:
        return Completion(list(self.output_ids), self.text, self.finish_reason or "length", len(self.prompt_ids),
                          list(self.output_logprobs))


def validate_prompt(prompt_ids: Seq[int], params: SamplingParams, vocab_size: int, max_seq_len: int) -> None:
    if len(prompt_ids) == 0:
        raise RequestError("prompt is empty: give a non-empty prompt or prompt_token_ids")
    bad = [t for t in prompt_ids if not (0 <= int(t) < vocab_size)]
    if bad:
        raise RequestError(f"prompt_token_ids contains {bad[0]}, outside the vocabulary [0, {vocab_size})")
    params.validate(vocab_size)
    if len(prompt_ids) + params.max_tokens > max_seq_len:
        raise RequestError(f"prompt tokens ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) = "
                           f"{len(prompt_ids) + params.max_tokens} exceeds the context limit {max_seq_len}")


def append_token(seq: Sequence, token: int, tokenizer: TextTokenizer | None, eos_token_ids: Seq[int]) -> None:
    """Record a generated token and decide whether the sequence is done.

    While the sequence runs, its text grows incrementally (an unfinished UTF-8 character waits
    for its last byte) and only the text's tail is searched for stop strings; when it finishes,
    the text is decoded once from all its tokens, so the final text is exactly `tokenizer.decode`."""
    seq.output_ids.append(int(token))
    p = seq.params
    if tokenizer is not None:
        if seq._decoder is None:
            seq._decoder = tokenizer.stream()
        piece = seq._decoder.add(token)
        # Only the new piece and the characters before it that a stop string could span are
        # searched: bounded work per token (the stop rules are bounded by `SamplingParams.validate`).
        if piece and p.stop:
            tail = seq._decoder.tail(len(piece) + p.longest_stop - 1)
            if any(stop in tail for stop in p.stop):
                full = tokenizer.decode(seq.output_ids)
                cuts = [at for at in (full.find(stop) for stop in p.stop) if at >= 0]
                seq.final_text = full[:min(cuts)] if cuts else full
                seq.finish_reason = "stop"
                return
    if token in p.stop_id_set or (not p.ignore_eos and token in eos_token_ids):
        seq.finish_reason = "stop"
    elif len(seq.output_ids) >= p.max_tokens:
        seq.finish_reason = "length"
    if seq.finish_reason is not None and tokenizer is not None:
        seq.final_text = tokenizer.decode(seq.output_ids)
