"""Plan controller: follows the traffic mix, with hysteresis (fake clock, no JAX)."""

from nitsum_jax.plans.spec import parse_plans
from nitsum_jax.scheduler.controller import Load, PlanController

PLANS = parse_plans("static: all=tp8@0-7; mixed: high=tp4@0-3, low=tp2@4-5, low=tp2@6-7; "
                    "burst: low=tp2@0-1, low=tp2@2-3, low=tp2@4-5, low=tp2@6-7")


def load(high=0, low=0):
    return Load(waiting={"high": high, "low": low}, running={}, slo_attainment={})


def run(trace, controller, dt=0.1):
    switches = []
    for i, item in enumerate(trace):
        decision = controller.decide(item, i * dt)
        if decision:
            switches.append((round(i * dt, 1), decision[0]))
    return switches


def test_controller_moves_to_the_plan_the_traffic_needs_after_the_hold_time():
    c = PlanController(PLANS, "static", hold_s=0.5, min_dwell_s=1.0)
    trace = [load(high=2, low=5)] * 20 + [load(low=8)] * 30
    assert run(trace, c) == [(0.5, "mixed"), (2.5, "burst")]


def test_controller_does_not_flap_on_traffic_that_alternates_faster_than_the_hold_time():
    c = PlanController(PLANS, "mixed", hold_s=0.5, min_dwell_s=1.0)
    trace = ([load(high=1, low=5)] * 3 + [load(low=5)] * 3) * 20  # mix changes every 0.3 s
    assert run(trace, c) == []


def test_controller_switches_at_most_once_per_dwell_time_on_slow_alternation():
    c = PlanController(PLANS, "mixed", hold_s=0.2, min_dwell_s=2.0)
    trace = ([load(high=1)] * 8 + [load(low=5)] * 8) * 6  # mix changes every 0.8 s
    switches = run(trace, c)
    times = [t for t, _ in switches]
    assert all(b - a >= 2.0 for a, b in zip(times, times[1:]))
    assert len(switches) >= 2


def test_missed_high_slo_keeps_the_reserved_plan_even_without_queued_high():
    c = PlanController(PLANS, "mixed", hold_s=0.1, min_dwell_s=0.1)
    bad = Load(waiting={"low": 9}, running={}, slo_attainment={"high": 0.5})
    assert run([bad] * 10, c) == []


def test_measured_step_costs_pick_the_throughput_plan_with_most_capacity():
    plans = parse_plans("static: all=tp8@0-7; mixed: high=tp4@0-3, low=tp2@4-5, low=tp2@6-7; "
                        "wide: low=tp4@0-3, low=tp4@4-7; burst: low=tp2@0-1, low=tp2@2-3, low=tp2@4-5, low=tp2@6-7")
    c = PlanController(plans, "static", hold_s=0.0, min_dwell_s=0.0)
    low_only = dict(waiting={"low": 9}, running={}, slo_attainment={})
    # TP2 steps measured slow (e.g. a kernel that scales badly): two TP4 lanes beat four TP2 lanes.
    slow_tp2 = Load(**low_only, lane_step_s={"tp4@0-3": 0.010, "tp2@0-1": 0.030})
    assert c.preferred(slow_tp2)[0] == "wide"
    fast_tp2 = Load(**low_only, lane_step_s={"tp4@0-3": 0.010, "tp2@0-1": 0.012})
    assert c.preferred(fast_tp2)[0] == "burst"


def test_a_reserved_plan_whose_high_lane_misses_the_tpot_target_loses_to_a_faster_one():
    c = PlanController(PLANS, "burst", hold_s=0.0, min_dwell_s=0.0, urgent_tpot_target_s=0.02)
    high = dict(waiting={"high": 2, "low": 3}, running={}, slo_attainment={})
    assert c.preferred(Load(**high, lane_step_s={"tp4@0-3": 0.015}))[0] == "mixed"
    too_slow = {"tp4@0-3": 0.025, "tp8@0-7": 0.012}
    assert c.preferred(Load(**high, lane_step_s=too_slow))[0] == "static"


def test_an_unhealthy_lane_rules_out_its_plans_and_the_controller_leaves_at_once():
    c = PlanController(PLANS, "mixed", hold_s=5.0, min_dwell_s=5.0)
    c.force("mixed", 0.0)
    c.mark_unhealthy("tp2@4-5")
    decision = c.decide(load(high=1, low=3), 0.1)  # within the dwell time, but mixed is broken
    assert decision is not None and decision[0] == "static"
    assert all(c.usable(c.plans[name]) for name in ["static"]) and not c.usable(c.plans["burst"])
