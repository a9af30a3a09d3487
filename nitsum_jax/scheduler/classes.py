"""Priority classes (tiers): name, rank (0 = most urgent), SLO targets, share and queue bound."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PriorityClass:
    name: str
    rank: int  # lower is more urgent
    ttft_target_s: float  # time to first token
    tpot_target_s: float  # time per output token
    max_queue: int = 1024  # waiting requests beyond this are refused (RESOURCE_EXHAUSTED)
    aging_s: float = 2.0  # a waiting request gains one rank per this many seconds (no starvation)


def default_classes() -> dict[str, PriorityClass]:
    """`high` (rank 0: TTFT 0.5 s, TPOT 50 ms) and `low` (rank 1: TTFT 10 s, TPOT 0.5 s), by name."""
    return {
        "high": PriorityClass("high", rank=0, ttft_target_s=0.5, tpot_target_s=0.05),
        "low": PriorityClass("low", rank=1, ttft_target_s=10.0, tpot_target_s=0.5),
    }
