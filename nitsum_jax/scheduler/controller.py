"""Adaptive plan control with hysteresis. Plain Python: it reads load figures, returns a plan.

It reasons by tier rank and SLO attainment, never by a tier's name. The *urgent* tiers are
every tier above the least urgent rank; the *bulk* tiers are those of the least urgent rank.
Each plan is one of three kinds: 'reserved' (a lane that serves no bulk tier, kept for urgent
work), 'shared' (every lane serves every tier) and 'throughput' (the rest). The load says which
kind is wanted: reserved while urgent work waits or runs, or while an urgent tier's recent SLO
attainment is under the floor; throughput when bulk work is queued and urgent tiers are idle;
shared otherwise. Among reserved plans, those whose reserved lane serves the most urgent tier
that has work come first. Among the plans the load could use, the measured step costs of their
lanes decide: a reserved plan must give the most urgent tier present a step time within that
tier's TPOT target (else the plan whose lane for it is fastest wins), and among the rest the
plan with the most measured decode capacity (sum over lanes of 1 / step time) wins. A lane
measured to be unhealthy rules out every plan that uses it. A different plan must win for
`hold_s` seconds in a row, and at least `min_dwell_s` must pass since the last switch, so
alternating traffic does not make the controller flap. Lanes are named by their one identity
(`LaneSpec.name`, e.g. `tp2@0-1`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from nitsum_jax.scheduler.classes import PriorityClass, by_rank, default_classes, urgent_names

if TYPE_CHECKING:  # plans pull in JAX; the controller only reads their lane specs
    from nitsum_jax.plans.spec import LaneSpec, Plan


@dataclasses.dataclass(frozen=True)
class Load:
    waiting: dict[str, int]  # class -> queued requests
    running: dict[str, int]  # class -> running requests
    slo_attainment: dict[str, float]  # class -> fraction of recent requests meeting TTFT and TPOT
    # lane name -> measured seconds of one decode step (EMA); lanes not yet measured are absent
    lane_step_s: dict[str, float] = dataclasses.field(default_factory=dict)


def plan_kind(plan: Plan, classes: dict[str, PriorityClass] | None = None) -> str:
    """'shared' (every lane serves every tier), 'reserved' (a lane serves no bulk tier), 'throughput'."""
    classes = classes or default_classes()
    bulk = set(classes) - urgent_names(classes)
    if any(not any(lane.serves(c) for c in bulk) for lane in plan.lanes):
        return "reserved"
    if all(all(lane.serves(c) for c in classes) for lane in plan.lanes):
        return "shared"
    return "throughput"


class PlanController:
    def __init__(self, plans: tuple[Plan, ...], initial: str, *, classes: dict[str, PriorityClass] | None = None,
                 hold_s: float = 1.0, min_dwell_s: float = 2.0, slo_floor: float = 0.9,
                 urgent_tpot_target_s: float | None = None):
        """`urgent_tpot_target_s`: the step time a reserved lane must beat for the most urgent
        tier present (None: that tier's own TPOT target)."""
        self.plans = {p.name: p for p in plans}
        self.classes = classes or default_classes()
        self.current = initial
        self.hold_s, self.min_dwell_s, self.slo_floor = hold_s, min_dwell_s, slo_floor
        self.urgent_tpot_target_s = urgent_tpot_target_s
        self.unhealthy: set[str] = set()  # lane names
        self._urgent = [c for c in by_rank(self.classes) if c.name in urgent_names(self.classes)]
        self._urgent_set = {c.name for c in self._urgent}
        # Fixed per plan set (the control loop asks every tick): the plans whose reserved lane
        # serves each urgent tier, and the usable plans (until a lane fails).
        self._fitting = {c.name: [p for p in plans if any(_reserved(lane, self.classes) and lane.serves(c.name)
                                                          for lane in p.lanes)] for c in self._urgent}
        self._usable: list[Plan] | None = None
        self._kinds = {p.name: plan_kind(p, self.classes) for p in plans}
        self._last_switch = float("-inf")
        self._candidate: tuple[str, float] | None = None

    def mark_unhealthy(self, lane_name: str) -> None:
        """A lane failed: plans that use it are no longer chosen."""
        self.unhealthy.add(lane_name)
        self._usable = None

    def usable(self, plan: Plan) -> bool:
        return not any(lane.name in self.unhealthy for lane in plan.lanes)

    def preferred(self, load: Load) -> tuple[str, str]:
        """(plan, reason) the load asks for, ignoring hysteresis."""
        present = [c for c in self._urgent if load.waiting.get(c.name, 0) + load.running.get(c.name, 0) > 0]
        missed = [c for c in self._urgent if load.slo_attainment.get(c.name, 1.0) < self.slo_floor]
        bulk_waiting = sum(n for c, n in load.waiting.items() if c in self.classes and c not in self._urgent_set)
        want, reason, urgent = "shared", "light load", None
        if present or missed:
            urgent = (present or missed)[0]
            work = sum(load.waiting.get(c.name, 0) + load.running.get(c.name, 0) for c in present)
            want = "reserved"
            reason = (f"urgent work present ({work}, most urgent {urgent.name!r})" if present else
                      f"{urgent.name!r} SLO attainment below {self.slo_floor}")
        elif bulk_waiting > 0:
            want, reason = "throughput", f"{bulk_waiting} bulk requests queued, no urgent work"
        if self._usable is None:
            self._usable = [p for p in self.plans.values() if self.usable(p)]
        usable = self._usable
        if not usable:
            return self.current, "no plan without an unhealthy lane"
        kind = [p for p in usable if self._kinds[p.name] == want] or usable
        if want == "reserved":
            choice = self._fastest_urgent(kind, usable, load.lane_step_s, urgent)
        else:
            choice = max(kind, key=lambda p: (_capacity(p, load.lane_step_s), p.name == self.current))
        if choice.name != self.current and not self.usable(self.plans[self.current]):
            reason = f"current plan {self.current} has an unhealthy lane; " + reason
        return choice.name, reason

    def _fastest_urgent(self, reserved: list[Plan], usable: list[Plan], step_s: dict[str, float],
                        urgent: PriorityClass) -> Plan:
        """The reserved plan whose reserved lane serves `urgent` (the current one if it is such a
        plan), unless measured steps say its lane for `urgent` misses the TPOT target while
        another plan's lane for it meets it."""
        fitting = [p for p in self._fitting[urgent.name] if p in reserved] or reserved
        best = self.plans[self.current] if self.current in {p.name for p in fitting} else fitting[0]
        target = self.urgent_tpot_target_s if self.urgent_tpot_target_s is not None else urgent.tpot_target_s
        step = _step_for(best, step_s, urgent.name)
        if step is None or step <= target:
            return best
        alternatives = [(s, p) for p in usable if (s := _step_for(p, step_s, urgent.name)) is not None and s <= target]
        return min(alternatives, key=lambda sp: sp[0])[1] if alternatives else best

    @property
    def settled(self) -> bool:
        """No switch is being considered: until the load changes, `decide` stays (None)."""
        return self._candidate is None

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


def _reserved(lane: LaneSpec, classes: dict[str, PriorityClass]) -> bool:
    bulk = set(classes) - urgent_names(classes)
    return not any(lane.serves(c) for c in bulk)


def _step_for(plan: Plan, step_s: dict[str, float], class_name: str) -> float | None:
    """Measured step time of the plan's fastest lane that serves `class_name` (None: unmeasured)."""
    times = [step_s[lane.name] for lane in plan.lanes if lane.serves(class_name) and lane.name in step_s]
    return min(times) if times else None


def _capacity(plan: Plan, step_s: dict[str, float]) -> float:
    """Decode steps per second summed over the plan's lanes, from measured step times. A lane
    not measured yet borrows the time of a measured lane of the same TP degree; with nothing
    to go on every plan scores 0 and the kind alone decides."""
    by_tp: dict[int, float] = {}
    for name, s in step_s.items():
        by_tp.setdefault(int(name[2:name.index("@")]), s)
    total = 0.0
    for lane in plan.lanes:
        s = step_s.get(lane.name, by_tp.get(lane.tp))
        if s is None:
            return 0.0
        total += 1.0 / s
    return total
