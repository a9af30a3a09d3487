"""Adaptive plan control with hysteresis. Plain Python: it reads load figures, returns a plan.

Each plan gets a score from the current load: plans with a lane reserved for `high` win while
high work waits or runs, or while high's recent TTFT misses its target; plans where every lane
serves low win when low work is queued and high is idle. A different plan must win for
`hold_s` seconds in a row, and at least `min_dwell_s` must pass since the last switch, so
alternating traffic does not make the controller flap.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plans pull in JAX; the controller only reads their lane specs
    from nitsum_jax.plans.spec import Plan


@dataclasses.dataclass(frozen=True)
class Load:
    waiting: dict[str, int]  # class -> queued requests
    running: dict[str, int]  # class -> running requests
    slo_attainment: dict[str, float]  # class -> fraction of recent requests meeting TTFT and TPOT


def plan_kind(plan: Plan) -> str:
    """'shared' (every lane serves every class), 'reserved' (a lane only for high), 'throughput'."""
    if any(lane.classes == ("high",) for lane in plan.lanes):
        return "reserved"
    if all("all" in lane.classes for lane in plan.lanes):
        return "shared"
    return "throughput"


class PlanController:
    def __init__(self, plans: tuple[Plan, ...], initial: str, *, hold_s: float = 1.0, min_dwell_s: float = 2.0,
                 slo_floor: float = 0.9):
        self.plans = {p.name: p for p in plans}
        self.current = initial
        self.hold_s, self.min_dwell_s, self.slo_floor = hold_s, min_dwell_s, slo_floor
        self._last_switch = float("-inf")
        self._candidate: tuple[str, float] | None = None

    def preferred(self, load: Load) -> tuple[str, str]:
        """(plan, reason) the load asks for, ignoring hysteresis."""
        high = load.waiting.get("high", 0) + load.running.get("high", 0)
        low_waiting = load.waiting.get("low", 0)
        want, reason = "shared", "light load"
        if high > 0 or load.slo_attainment.get("high", 1.0) < self.slo_floor:
            want, reason = "reserved", f"high work present ({high}) or high SLO below {self.slo_floor}"
        elif low_waiting > 0:
            want, reason = "throughput", f"{low_waiting} low requests queued, no high work"
        for name, plan in self.plans.items():
            if plan_kind(plan) == want:
                return name, reason
        return self.current, "no plan of the wanted kind"

    def decide(self, load: Load, now: float) -> tuple[str, str] | None:
        """The plan to switch to now, with its reason, or None to stay."""
        want, reason = self.preferred(load)
        if want == self.current:
            self._candidate = None
            return None
        if self._candidate is None or self._candidate[0] != want:
            self._candidate = (want, now)
            return None
        if now - self._candidate[1] < self.hold_s or now - self._last_switch < self.min_dwell_s:
            return None
        self.current, self._last_switch, self._candidate = want, now, None
        return want, reason

    def force(self, name: str, now: float) -> None:
        """Record a switch made outside the controller (it then dwells before moving again)."""
        self.current, self._last_switch, self._candidate = name, now, None
