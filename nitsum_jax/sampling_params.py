"""A request's sampling parameters, host-side and JAX-free (the device side is `sampling`)."""

from __future__ import annotations

import dataclasses
import functools


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as in vLLM)
# Bounds of a request's stop rules: each generated token is checked against them (under the
# engine's lock), so their size bounds the per-token work and the memory a finished request keeps.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 256


class SamplingError(ValueError):
    """A sampling parameter is outside its accepted range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples: greedy by default; `seed` fixes its draw whatever shares the batch."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = a random seed drawn at submission
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @functools.cached_property
    def stop_id_set(self) -> frozenset[int]:
        """`stop_token_ids` as a set: an O(1) check per generated token."""
        return frozenset(self.stop_token_ids)

    @functools.cached_property
    def longest_stop(self) -> int:
        """Characters of the longest stop string (0 without any)."""
        return max((len(s) for s in self.stop), default=0)

    @property
    def greedy(self) -> bool:
        """Takes the argmax (temperatures this small would overflow logits / t)."""
        return self.temperature < GREEDY_BELOW

    def validate(self, vocab_size: int) -> None:
        """Raise `SamplingError` naming the field, the value and the accepted range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0 <= self.top_k <= vocab_size):
            raise SamplingError(f"top_k must be in [0, {vocab_size}] (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**32):
            raise SamplingError(f"seed must be in [0, 2**32), got {self.seed}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingError(f"stop_token_ids has {len(self.stop_token_ids)} entries, more than the limit "
                                f"{MAX_STOP_TOKEN_IDS}")
        for t in self.stop_token_ids:
            if not (0 <= t < vocab_size):
                raise SamplingError(f"stop_token_ids entry {t} is outside the vocabulary [0, {vocab_size})")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError(f"stop has {len(self.stop)} strings, more than the limit {MAX_STOP_STRINGS}")
        if any(not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty")
        if self.longest_stop > MAX_STOP_STRING_CHARS:
            raise SamplingError(f"a stop string has {self.longest_stop} characters, more than the limit "
                                f"{MAX_STOP_STRING_CHARS}")
