"""The engine contract: what the server, the bench and the notebooks use of an engine.

`runtime.Engine` implements it on real lanes; tests of the server run it against a small fake
that implements it too. Nothing above the engine reaches past this contract.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence as Seq

from nitsum_jax.sampling_params import SamplingParams
from nitsum_jax.scheduler import PriorityClass
from nitsum_jax.sequence import Completion


class Handle(Protocol):
    """One request in flight: iterate for its tokens as they are made."""

    request: object  # .request_id, .priority_class, .arrival, .deadline, .finish_reason
    seq: object  # .prompt_ids, .output_ids, .output_logprobs, .text
    first_token_time: float | None
    finish_time: float | None
    served_by: tuple[str, str, int] | None  # (plan, lane, tp) of its last step
    error: str | None
    cached_tokens: int  # prompt tokens reused from the prefix cache

    def __iter__(self) -> Iterator[int]: ...
    def cancel(self) -> None: ...
    def result(self, timeout: float | None = None) -> Completion: ...


class EngineAPI(Protocol):
    classes: dict[str, PriorityClass]  # the tiers, by name
    tokenizer: object | None  # .encode(text), .decode(ids); None: token ids only
    cfg: object  # .vocab_size, .eos_token_ids
    grid: object  # .max_seq_len: the longest prompt + output a request may ask for
    plan_name: str  # the plan in force
    plan_names: list[str]  # every plan of the set

    def submit(self, prompt: str | Seq[int], sampling: SamplingParams = ..., *, priority_class: str = ...,
               deadline_s: float | None = None, request_id: str | None = None,
               slo_targets: tuple[float | None, float | None] = (None, None),
               cache_salt: str | None = None) -> Handle: ...
    def stats(self) -> dict: ...
    def lanes_info(self) -> list[dict]: ...
    def close(self) -> None: ...
