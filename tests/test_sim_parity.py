"""The simulator makes the plan decisions the real engine makes, on a load whose decisions depend
on what waits and runs, not on how long steps take (the controller's SLO floor is off and every
kind of plan has one plan, so measured step times cannot change its choice)."""

import time

from nitsum_jax.bench.workload import BenchRequest
from nitsum_jax.engine import Engine
from nitsum_jax.plans import BucketGrid
from nitsum_jax.plans.spec import parse_plans
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.scheduler import PriorityClass
from nitsum_jax.scheduler.controller import PlanController
from nitsum_jax.sim.driver import Simulation, SimSettings
from nitsum_jax.sim.lanes import Grid
from nitsum_jax.sim.step_model import StepModel

PLANS = parse_plans("shared: all=tp1@0, all=tp1@1; reserved: high=tp1@0, low=tp1@1; "
                    "throughput: all=tp1@0, low=tp1@1")
CLASSES = {"high": PriorityClass("high", 0, 100.0, 100.0), "low": PriorityClass("low", 1, 100.0, 100.0)}
# Phase one: more bulk requests than the lanes' batch slots (bulk waits: throughput), then none
# waiting (shared). Phase two, once the engine is idle again: urgent work only (reserved), then none.
PHASES = [("low", 12), ("high", 6)]
EXPECTED = [("shared", "throughput"), ("throughput", "shared"), ("shared", "reserved"), ("reserved", "shared")]


def _controller():
    return PlanController(PLANS, "shared", classes=CLASSES, hold_s=0.05, min_dwell_s=0.05, slo_floor=0.0)


def _wait(condition, timeout_s=300.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _settled(engine):
    return (not engine.core.entries and engine.plan_name == "shared" and engine.core.pending_switch is None
            and engine.controller.preferred(engine.core.load())[0] == "shared")


def test_simulator_and_engine_switch_plans_alike_on_a_scripted_load(tiny_cfg, tiny_params):
    import jax

    grid = BucketGrid(decode_batch=(2,), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
    engine = Engine(tiny_cfg, tiny_params, PLANS, classes=CLASSES, num_pages=32, page_size=8, grid=grid,
                    devices=jax.devices()[:2], controller=_controller())
    try:
        for cls, n in PHASES:
            handles = [engine.submit([256, i, i + 1, 7], SamplingParams(max_tokens=40, ignore_eos=True),
                                     priority_class=cls) for i in range(n)]
            assert all(len(h.result(timeout=300).token_ids) == 40 for h in handles)
            _wait(lambda: _settled(engine))
        real = [(s.from_plan, s.to_plan) for s in engine.switches]
    finally:
        engine.close()

    from test_sim import tiny_profile

    requests = tuple(BenchRequest(f"{cls}-{i}", 30.0 * k, cls, 4, 40) for k, (cls, n) in enumerate(PHASES)
                     for i in range(n))
    sim = Simulation(StepModel(tiny_profile(tps=(1,))), CLASSES, PLANS,
                     SimSettings(grid=Grid((2,), (16,), 64), num_pages=32, page_size=8, chain_steps=0),
                     _controller())  # host-device lanes do not chain (the runtime on CPU)
    records = sim.run(requests)
    assert {r["status"] for r in records} == {"completed"}
    simulated = [(s.from_plan, s.to_plan) for s in sim.core.switches]
    assert real == EXPECTED
    assert simulated == EXPECTED
