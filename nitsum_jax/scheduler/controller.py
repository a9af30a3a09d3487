"""Adaptive plan control with hysteresis. Plain Python: it reads load figures, returns a plan.

Each plan is one of three kinds: 'reserved' (a lane only for `high`), 'shared' (every lane
serves every class) and 'throughput' (lanes for `low` only, or mixed). The load says which
kind is wanted: reserved while high work waits or runs, or while high's recent SLO
attainment is under its floor; throughput when low work is queued and high is idle; shared
otherwise. Among the plans the load could use, the measured step costs of their lanes
decide: a reserved plan must give high a step time within high's TPOT target (else the
plan whose high lane is fastest wins), and among the rest the plan with the most measured
decode capacity (sum over lanes of 1 / step time) wins. A lane measured to be unhealthy
rules out every plan that uses it. A different plan must win for `hold_s` seconds in a row,
and at least `min_dwell_s` must pass since the last switch, so alternating traffic does not
make the controller flap.
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
    # lane devices -> measured seconds of one decode step (EMA); lanes not yet measured are absent
    lane_step_s: dict[tuple[int, ...], float] = dataclasses.field(default_factory=dict)


def plan_kind(plan: Plan) -> str:
    """'shared' (every lane serves every class), 'reserved' (a lane only for high), 'throughput'."""
    if any(lane.classes == ("high",) for lane in plan.lanes):
        return "reserved"
    if all("all" in lane.classes for lane in plan.lanes):
        return "shared"
    return "throughput"


class PlanController:
    def __init__(self, plans: tuple[Plan, ...], initial: str, *, hold_s: float = 1.0, min_dwell_s: float = 2.0,
                 slo_floor: float = 0.9, high_tpot_target_s: float | None = None):
        self.plans = {p.name: p for p in plans}
        self.current = initial
        self.hold_s, self.min_dwell_s, self.slo_floor = hold_s, min_dwell_s, slo_floor
        self.high_tpot_target_s = high_tpot_target_s
        self.unhealthy: set[tuple[int, ...]] = set()
        self._last_switch = float("-inf")
        self._candidate: tuple[str, float] | None = None

    def mark_unhealthy(self, devices: tuple[int, ...]) -> None:
        """A lane failed: plans that use it are no longer chosen."""
        self.unhealthy.add(tuple(devices))

    def usable(self, plan: Plan) -> bool:
        return not any(lane.devices in self.unhealthy for lane in plan.lanes)

    def preferred(self, load: Load) -> tuple[str, str]:
        """(plan, reason) the load asks for, ignoring hysteresis."""
        high = load.waiting.get("high", 0) + load.running.get("high", 0)
        low_waiting = load.waiting.get("low", 0)
        want, reason = "shared", "light load"
        if high > 0 or load.slo_attainment.get("high", 1.0) < self.slo_floor:
            want, reason = "reserved", f"high work present ({high}) or high SLO below {self.slo_floor}"
        elif low_waiting > 0:
            want, reason = "throughput", f"{low_waiting} low requests queued, no high work"
        usable = [p for p in self.plans.values() if self.usable(p)]
        if not usable:
            return self.current, "no plan without an unhealthy lane"
        kind = [p for p in usable if plan_kind(p) == want] or usable
        if want == "reserved":
            choice = self._fastest_high(kind, usable, load.lane_step_s)
        else:
            choice = max(kind, key=lambda p: (_capacity(p, load.lane_step_s), p.name == self.current))
        if choice.name != self.current and not self.usable(self.plans[self.current]):
            reason = f"current plan {self.current} has an unhealthy lane; " + reason
        return choice.name, reason

    def _fastest_high(self, reserved: list[Plan], usable: list[Plan],
                      step_s: dict[tuple[int, ...], float]) -> Plan:
        """The reserved plan, unless measured steps say its high lane misses high's TPOT target
        while another plan's high-serving lane meets it."""
        best = reserved[0] if self.current not in {p.name for p in reserved} else self.plans[self.current]
        target = self.high_tpot_target_s
        high_step = _high_step(best, step_s)
        if target is None or high_step is None or high_step <= target:
            return best
        alternatives = [(s, p) for p in usable if (s := _high_step(p, step_s)) is not None and s <= target]
        return min(alternatives, key=lambda sp: sp[0])[1] if alternatives else best

    def decide(self, load: Load, now: float) -> tuple[str, str] | None:
        """The plan to switch to now, with its reason, or None to stay."""
        want, reason = self.preferred(load)
        if want == self.current:
            self._candidate = None
            return None
        urgent = not self.usable(self.plans[self.current])  # a failed lane: leave at once
        if not urgent:
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


def _high_step(plan: Plan, step_s: dict[tuple[int, ...], float]) -> float | None:
    """Measured step time of the fastest lane of the plan that serves high (None: unmeasured)."""
    times = [step_s[lane.devices] for lane in plan.lanes if lane.serves("high") and lane.devices in step_s]
    return min(times) if times else None


def _capacity(plan: Plan, step_s: dict[tuple[int, ...], float]) -> float:
    """Decode steps per second summed over the plan's lanes, from measured step times. A lane
    not measured yet borrows the time of a measured lane of the same TP degree; with nothing
    to go on every plan scores 0 and the kind alone decides."""
    by_tp: dict[int, float] = {}
    for devices, s in step_s.items():
        by_tp.setdefault(len(devices), s)
    total = 0.0
    for lane in plan.lanes:
        s = step_s.get(lane.devices, by_tp.get(lane.tp))
        if s is None:
            return 0.0
        total += 1.0 / s
    return total
