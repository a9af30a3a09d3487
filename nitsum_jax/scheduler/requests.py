"""What the scheduler works on: requests, their step work, lanes' queues and the measured costs
its decisions weigh. Plain Python, no JAX."""

from __future__ import annotations

import dataclasses
import enum
import typing

from nitsum_jax.pages import PageAllocator


class QueueFull(RuntimeError):
    """The class queue is at its bound (the server answers RESOURCE_EXHAUSTED)."""


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    priority_class: str
    prompt_len: int
    max_tokens: int
    arrival: float
    deadline: float | None = None  # absolute clock time
    # Per-request SLO targets stricter than the class's (a gateway's SLO headers); None: the class's.
    ttft_target_s: float | None = None
    tpot_target_s: float | None = None
    state: State = State.WAITING
    lane: str | None = None
    num_computed: int = 0  # tokens whose K/V are in the lane's pages
    num_output: int = 0
    preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "deadline"
    cancel_requested: bool = False
    page_keys: tuple[bytes, ...] = ()  # content keys of its full pages, prompt and output (empty: no caching)
    cached_tokens: int | None = None  # prompt tokens found cached at its first admission (None: not admitted)
    published: int = 0  # full pages offered to its lane's cache so far

    @property
    def total_len(self) -> int:
        """Tokens the sequence holds now: the prompt plus what it generated."""
        return self.prompt_len + self.num_output

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.total_len - (1 if self.num_output else 0)


class Work(typing.NamedTuple):
    """One row of a step: `num_tokens` tokens of `request` from `start_pos` (a tuple: a step
    makes one per row, and a frozen dataclass costs three times as much to build)."""

    request: Request
    start_pos: int
    num_tokens: int  # 1 for decode, a chunk for prefill


@dataclasses.dataclass
class LaneQueue:
    name: str
    classes: tuple[str, ...]  # classes this lane serves ("all" for every class)
    allocator: PageAllocator
    max_batch: int
    running: list[Request] = dataclasses.field(default_factory=list)

    def serves(self, cls: str) -> bool:
        return "all" in self.classes or cls in self.classes


@dataclasses.dataclass
class CostModel:
    """Measured costs the victim decision uses; the engine updates them from real steps and moves."""

    move_bytes_per_s: float = 100e9
    kv_bytes_per_token: int = 1
    recompute_s_per_token: float = 1e-4

    def move_s(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.move_bytes_per_s

    def recompute_s(self, tokens: int) -> float:
        return tokens * self.recompute_s_per_token


@dataclasses.dataclass(frozen=True)
class Move:
    """A sequence's KV pages go from one lane to another (the driver carries it out)."""

    request: Request
    src: str  # lane names
    dst: str
    tokens: int  # tokens whose K/V move


@dataclasses.dataclass
class SwitchPlan:
    """What a change of lanes does to the running sequences of the lanes that leave: each
    moves (its pages to a lane of the new set) or is recomputed (back in line, pages freed),
    whichever the measured costs favour where there is room."""

    moves: list[Move] = dataclasses.field(default_factory=list)
    recomputed: list[Request] = dataclasses.field(default_factory=list)
    leaving: dict[str, LaneQueue] = dataclasses.field(default_factory=dict)  # lane name -> its old queue
