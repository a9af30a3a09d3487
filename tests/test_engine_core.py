"""The engine core's decisions with fake lanes and a fake clock, in milliseconds: no threads, no
JAX. Switch (move or recompute by measured costs), lane failure, deadlines, N-tier ordering."""

import dataclasses

import pytest

from fakes import FakeLane
from nitsum_jax.engine.core import EngineCore
from nitsum_jax.pages import PageAllocator
from nitsum_jax.plans.spec import PlanError, check_plan_classes, parse_plans
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.scheduler import PriorityClass
from nitsum_jax.scheduler.controller import PlanController

PAGE = 4


def tiers(n):
    names = ["realtime", "standard", "batch", "bulk"][:n]
    return {name: PriorityClass(name, rank=i, ttft_target_s=0.5 * (i + 1), tpot_target_s=0.05 * (i + 1),
                                aging_s=1.0) for i, name in enumerate(names)}


def make_core(plan_text, classes, num_pages=32, max_batch=4, controller=None, **kw):
    plans = parse_plans(plan_text)
    lanes = {}
    for plan in plans:
        for spec in plan.lanes:
            lanes.setdefault(spec.name, FakeLane(spec.name, spec, PageAllocator(num_pages, PAGE)))
    return EngineCore(classes, plans, lanes, max_batch=max_batch, prefill_chunk=16, token_budget=64,
                      controller=controller, **kw)


def step(core, lane, now, token=7):
    """Run the lane's next step with a fake device: every row that draws a token gets `token`."""
    work = core.next_step(lane, now)
    if not work:
        return []
    results = [(work, [token] * len(work), [-0.5] * len(work))]
    core.step_done(lane, work, results, 0.01, now)
    return work


def submit(core, rid, cls, now, prompt=6, max_tokens=3, deadline_s=None):
    ids = [1 + (hash(rid) + i) % 50 for i in range(prompt)]
    return core.submit(rid, ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0, cls, now, deadline_s)


def test_the_core_answers_the_same_events_with_the_same_decisions():
    def trace():
        core = make_core("one: all=tp1@0", tiers(3), max_batch=2)
        log = []
        for i in range(9):
            submit(core, f"r{i}", ["batch", "standard", "realtime"][i % 3], now=i * 0.001)
        for t in range(40):
            log.append([(w.request.request_id, w.num_tokens) for w in step(core, "tp1@0", 0.01 + t * 0.01)])
            log.append([e.request.request_id for e in core.take_finished(0.01 + t * 0.01)])
        return log
    assert trace() == trace()


def test_under_contention_each_tier_is_admitted_in_rank_order():
    core = make_core("one: all=tp1@0", tiers(4), max_batch=1)
    for i, cls in enumerate(["bulk", "batch", "standard", "realtime"]):  # least urgent arrives first
        submit(core, cls, cls, now=i * 0.001, max_tokens=1)
    order = []
    for t in range(12):
        step(core, "tp1@0", 0.01 + t * 0.001)
        order += [e.request.priority_class for e in core.take_finished(0.01 + t * 0.001)]
    assert order == ["realtime", "standard", "batch", "bulk"]


def test_the_least_urgent_tier_keeps_completing_under_sustained_urgent_load():
    core = make_core("one: all=tp1@0", tiers(3), max_batch=1)
    for i in range(3):
        submit(core, f"bulk-{i}", "batch", now=0.0, max_tokens=2)
    done, now = [], 0.0
    for t in range(400):  # a new realtime request every step: more than the lane can serve
        now = t * 0.05
        submit(core, f"rt-{t}", "realtime", now=now, max_tokens=2)
        step(core, "tp1@0", now)
        done += [(now, e.request.priority_class) for e in core.take_finished(now)]
    batch_done = [t for t, c in done if c == "batch"]
    assert len(batch_done) == 3  # aging lets every bulk request through
    assert batch_done[-1] <= 20.0 - 1.0  # within the run, not starved until the end
    # The lowest tier's measured completion rate over the run is above a floor.
    assert len(batch_done) / now >= 3 / 20.0


def test_a_deadline_ends_a_waiting_request_and_a_running_one_frees_its_pages():
    core = make_core("one: all=tp1@0", tiers(2), max_batch=1)
    submit(core, "running", "realtime", now=0.0, max_tokens=50, deadline_s=0.05)
    submit(core, "waiting", "standard", now=0.0, max_tokens=50, deadline_s=0.02)
    step(core, "tp1@0", 0.01)
    step(core, "tp1@0", 0.06)
    reasons = {e.request.request_id: e.request.finish_reason for e in core.take_finished(0.06)}
    assert reasons == {"running": "deadline", "waiting": "deadline"}
    assert core.lanes["tp1@0"].allocator.num_used == 0


def test_a_switch_moves_sequences_when_moving_is_cheaper_and_recomputes_them_otherwise():
    for move_bytes_per_s, expect_moved in ((1e12, True), (1.0, False)):
        core = make_core("a: all=tp1@0; b: all=tp1@1", tiers(2))
        core.costs.move_bytes_per_s, core.costs.kv_bytes_per_token = move_bytes_per_s, 1024
        submit(core, "r", "standard", now=0.0, max_tokens=20)
        step(core, "tp1@0", 0.01)
        step(core, "tp1@0", 0.02)
        plan = core.begin_switch("b")
        assert bool(plan.moves) == expect_moved and bool(plan.recomputed) == (not expect_moved)
        if expect_moved:
            assert plan.moves[0].src == "tp1@0" and plan.moves[0].dst == "tp1@1"
        core.end_switch("b", "test", plan, len(plan.moves), 0, 0.0, 0.0, 0.03)
        assert core.plan_name == "b" and core.switches[-1].recomputed == len(plan.recomputed)


def test_a_failed_switch_move_is_recomputed_with_its_pages_back():
    core = make_core("a: all=tp1@0; b: all=tp1@1", tiers(2))
    core.costs.move_bytes_per_s, core.costs.kv_bytes_per_token = 1e12, 1024
    submit(core, "r", "standard", now=0.0, max_tokens=20)
    step(core, "tp1@0", 0.01)
    plan = core.begin_switch("b")
    [move] = plan.moves
    core.move_failed(move, plan)
    core.end_switch("b", "test", plan, 0, 0, 0.0, 0.0, 0.02)
    assert core.switches[-1].recomputed == 1 and core.lanes["tp1@0"].allocator.num_used == 0
    assert [r.request_id for r in core.scheduler.waiting] == ["r"]
    step(core, "tp1@1", 0.03)  # recomputed from its prompt and output on the new lane
    assert core.entries["r"].request.num_computed > 0


def test_a_failed_lane_sends_its_requests_to_a_plan_without_it():
    classes = tiers(2)
    plans = "a: all=tp1@0, all=tp1@1; b: all=tp1@1"
    core = make_core(plans, classes, controller=PlanController(parse_plans(plans), "a", classes=classes))
    submit(core, "r", "standard", now=0.0, max_tokens=20)
    step(core, "tp1@0", 0.01)
    core.lane_failed("tp1@0", RuntimeError("device lost"))
    assert core.pending_switch[0] == "b" and "tp1@0" in core.unhealthy
    assert core.lanes["tp1@0"].allocator.num_used == 0 and [r.request_id for r in core.scheduler.waiting] == ["r"]
    plan = core.begin_switch("b")
    core.end_switch("b", core.pending_switch[1], plan, 0, 0, 0.0, 0.0, 0.02)
    for t in range(30):
        step(core, "tp1@1", 0.03 + t * 0.01)
    [entry] = core.take_finished(0.5)
    assert entry.request.finish_reason == "length" and entry.served_by[1] == "tp1@1"


def test_a_lane_failure_with_no_plan_left_fails_the_requests_no_lane_serves():
    core = make_core("a: realtime=tp1@0, standard=tp1@1", tiers(2))
    submit(core, "rt", "realtime", now=0.0)
    core.lane_failed("tp1@0", RuntimeError("device lost"))
    [entry] = core.take_finished(0.01)
    assert entry.request.finish_reason == "error" and "no healthy lane" in entry.error


def test_three_tier_plan_switch_trace_reserves_a_lane_for_the_most_urgent_tier_present():
    classes = tiers(3)
    text = ("shared: all=tp1@0, all=tp1@1; rt: realtime=tp1@0, standard+batch=tp1@1; "
            "std: standard=tp1@0, realtime+batch=tp1@1")
    controller = PlanController(parse_plans(text), "shared", classes=classes, hold_s=0.0, min_dwell_s=0.0)
    core = make_core(text, classes, controller=controller)
    decisions = []
    submit(core, "s", "standard", now=0.0)
    core.tick(0.0)  # the candidate must win twice in a row (hysteresis), even with hold 0
    decisions.append(core.tick(0.01)[0])
    core.pending_switch = None
    submit(core, "r", "realtime", now=0.1)
    core.tick(0.1)
    decisions.append(core.tick(0.11)[0])
    assert decisions == ["std", "rt"]


def test_plans_must_name_known_classes_and_a_plan_that_strands_one_is_named():
    with pytest.raises(PlanError, match="unknown class 'high'"):
        check_plan_classes(parse_plans("a: high=tp1@0, all=tp1@1"), tiers(2))
    assert check_plan_classes(parse_plans("a: realtime=tp1@0; b: all=tp1@0"), tiers(2)) == [
        "plan 'a' has no lane for class(es) ['standard']: while it is in force their requests wait"]


def test_an_urgent_lane_limits_its_prefill_tokens_to_keep_the_tpot_target_and_a_bulk_lane_does_not():
    classes = tiers(2)  # realtime TPOT 0.05 s, standard 0.1 s
    core = make_core("a: realtime=tp1@0, standard=tp1@1", classes, num_pages=64, tpot_budget=True)
    for lane, cls in (("tp1@0", "realtime"), ("tp1@1", "standard")):
        submit(core, f"{cls}-0", cls, now=0.0, prompt=8, max_tokens=30)
        work = core.next_step(lane, 0.0)
        core.step_done(lane, work, [(work, [7], [-0.5])], 0.05, 0.0)  # its prompt
        work = core.next_step(lane, 0.06)
        core.step_done(lane, work, [(work, [7], [-0.5])], 0.010, 0.06)  # a decode step: 10 ms
        submit(core, f"{cls}-1", cls, now=0.07, prompt=60, max_tokens=5)
        work = core.next_step(lane, 0.07)  # decode + a 16-token chunk: measured 10 ms + 16 x 1 ms
        core.step_done(lane, work, [(work, [7] * len(work), [-0.5] * len(work))], 0.026, 0.08)
    # realtime: (0.9 x 50 ms - 10 ms) / 1 ms = 35 prefill tokens a step; standard is not urgent.
    assert core.scheduler.prefill_limit == {"tp1@0": 35}
    work = core.next_step("tp1@0", 0.09)
    assert sum(w.num_tokens for w in work if w.num_tokens > 1) <= 35


def test_the_prefill_limit_counts_each_chunk_as_the_program_that_runs_it():
    """Prefill programs have fixed lengths (8 and 16 here): a 5-token chunk runs, and costs, as
    an 8-token program. The limit is learned and spent in program lengths, so a short chunk does
    not make prefill look dear, and chunks are cut to the longest program that fits."""
    classes = tiers(2)  # realtime TPOT 0.05 s
    core = make_core("a: realtime=tp1@0", classes, num_pages=64, tpot_budget=True, prefill_buckets=(8, 16))
    submit(core, "r0", "realtime", now=0.0, prompt=8, max_tokens=40)
    work = core.next_step("tp1@0", 0.0)
    core.step_done("tp1@0", work, [(work, [7], [-0.5])], 0.05, 0.0)
    work = core.next_step("tp1@0", 0.06)
    core.step_done("tp1@0", work, [(work, [7], [-0.5])], 0.010, 0.06)  # decode: 10 ms
    submit(core, "r1", "realtime", now=0.07, prompt=5, max_tokens=5)
    work = core.next_step("tp1@0", 0.07)
    assert sorted(w.num_tokens for w in work) == [1, 5]
    core.step_done("tp1@0", work, [(work, [7] * len(work), [-0.5] * len(work))], 0.018, 0.08)  # + 8 ms
    # 8 ms for the 8-token program: 1 ms a token, so (0.9 x 50 - 10) / 1 = 35 tokens of programs
    # (counting the 5 real tokens, as before, would give 1.6 ms a token and 21).
    assert core.prefill_s_per_token["tp1@0"] == pytest.approx(0.001)
    assert core.scheduler.prefill_limit == {"tp1@0": 35}
    for i in range(3):
        submit(core, f"long-{i}", "realtime", now=0.09, prompt=60, max_tokens=2)
    work = core.next_step("tp1@0", 0.09)
    chunks = [w.num_tokens for w in work if w.num_tokens > 1]
    assert chunks == [16, 16]  # two 16-token programs (32 <= 35); a third would need 16 more
    core.scheduler.prefill_limit["tp1@0"] = 20
    assert core.scheduler._prefill_take("tp1@0", 60, 64, 20) == (16, 16)
    assert core.scheduler._prefill_take("tp1@0", 6, 64, 20) == (6, 8)
    assert core.scheduler._prefill_take("tp1@0", 60, 64, 7) == (0, 0)  # no program fits: none runs
    # A target no program fits still lets the shortest run, so prompts progress.
    core.classes["realtime"] = dataclasses.replace(classes["realtime"], tpot_target_s=0.001)
    core._learn_budget("tp1@0", work, 0.05)
    assert core.scheduler.prefill_limit == {"tp1@0": 8}


def test_a_stricter_per_request_target_judges_its_slo_attainment():
    core = make_core("one: all=tp1@0", tiers(2))  # realtime: TTFT 0.5 s
    sampling = SamplingParams(max_tokens=1, ignore_eos=True)
    core.submit("lax", [1, 2, 3], sampling, 0, "realtime", 0.0)
    core.submit("strict", [1, 2, 3], sampling, 0, "realtime", 0.0, slo_targets=(0.1, None))
    core.submit("looser", [1, 2, 3], sampling, 0, "realtime", 0.0, slo_targets=(9.0, None))  # never looser
    assert core.entries["looser"].request.ttft_target_s == 0.5
    for t in range(6):
        step(core, "tp1@0", 0.3)  # first tokens 0.3 s after arrival: within 0.5, past 0.1
    core.take_finished(0.3)
    assert core.slo_attainment()["realtime"] == 2 / 3


def test_the_core_scheduler_and_simulator_import_no_jax():
    """The deterministic core runs without JAX (the simulator drives it on a virtual clock)."""
    import subprocess
    import sys

    code = ("import sys, nitsum_jax.engine.core, nitsum_jax.sim.driver, nitsum_jax.scheduler.controller; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
