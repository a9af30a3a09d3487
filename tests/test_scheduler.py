"""Scheduler core with a fake clock and no model: order, admission, preemption, aging, release."""

import pytest

from fakes import FakeClock
from nitsum_jax.pages import PageAllocator
from nitsum_jax.scheduler import LaneQueue, QueueFull, Request, Scheduler, State, default_classes
from nitsum_jax.scheduler.classes import PriorityClass

PAGE = 4


def make(num_pages=16, max_batch=4, budget=64, chunk=16, classes=None):
    clock = FakeClock()
    lane = LaneQueue("lane0", ("all",), PageAllocator(num_pages, PAGE), max_batch)
    sched = Scheduler(classes or default_classes(), [lane], clock=clock, token_budget=budget, prefill_chunk=chunk)
    return sched, lane, clock


def req(rid, cls, prompt=8, max_tokens=4, arrival=0.0, deadline=None):
    return Request(rid, cls, prompt, max_tokens, arrival, deadline)


def run_step(sched, lane="lane0"):
    work = sched.schedule(lane)
    sched.complete(lane, work)
    return work


def test_high_class_is_admitted_before_earlier_low():
    sched, lane, clock = make(max_batch=1)
    sched.submit(req("low", "low", arrival=0.0))
    sched.submit(req("high", "high", arrival=0.5))
    clock.now = 0.6
    assert [w.request.request_id for w in sched.schedule("lane0")] == ["high"]


def test_admission_waits_for_pages():
    sched, lane, clock = make(num_pages=3)  # 12 tokens
    sched.submit(req("a", "low", prompt=8))
    sched.submit(req("b", "low", prompt=8))
    work = sched.schedule("lane0")
    assert [w.request.request_id for w in work] == ["a"]
    assert lane.allocator.num_used == 2
    assert sched.waiting[0].request_id == "b"


def test_high_request_preempts_the_least_urgent_latest_running_request():
    sched, lane, clock = make(num_pages=4)  # 16 tokens: two low prompts of 8 fill it
    sched.submit(req("low-old", "low", arrival=0.0))
    sched.submit(req("low-new", "low", arrival=1.0))
    clock.now = 1.0
    run_step(sched)
    assert lane.allocator.num_free == 0
    sched.submit(req("high", "high", arrival=1.5))
    clock.now = 1.5
    work = sched.schedule("lane0")
    ids = [w.request.request_id for w in work]
    assert "high" in ids and "low-new" not in ids
    assert sched.preemption_log[-1][1:] == ("low-new", "high")
    victim = next(r for r in sched.waiting if r.request_id == "low-new")
    assert victim.state is State.WAITING and victim.num_computed == 0 and victim.arrival == 1.0


def test_a_preempted_request_is_not_preempted_again():
    sched, lane, clock = make(num_pages=4, max_batch=1)
    sched.submit(req("low", "low", prompt=4, max_tokens=10))
    run_step(sched)
    sched.submit(req("high-1", "high", prompt=4, max_tokens=1))
    run_step(sched)  # preempts low; high-1 finishes its one token
    assert sched.preemption_log[-1][1] == "low"
    for _ in range(3):
        run_step(sched)  # low comes back
    assert any(r.request_id == "low" for r in lane.running)
    sched.submit(req("high-2", "high", prompt=4, max_tokens=1))
    work = sched.schedule("lane0")
    assert [w.request.request_id for w in work] == ["low"]  # protected: high-2 waits
    assert [p[1] for p in sched.preemption_log] == ["low"]


def test_equal_classes_never_preempt_each_other():
    sched, lane, clock = make(num_pages=3)  # a's prompt and first decodes fill it
    sched.submit(req("a", "high"))
    run_step(sched)
    sched.submit(req("b", "high", arrival=1.0))
    assert [w.request.request_id for w in sched.schedule("lane0")] == ["a"]
    assert sched.preemption_log == []


def test_low_is_not_starved_under_continuous_high_load():
    sched, lane, clock = make(num_pages=64, max_batch=1)
    sched.submit(req("low", "low", prompt=4, max_tokens=1, arrival=0.0))
    served_low_at = None
    for step in range(200):
        clock.now = step * 0.1
        sched.submit(req(f"high-{step}", "high", prompt=4, max_tokens=1, arrival=clock.now))
        work = run_step(sched)
        if any(w.request.request_id == "low" for w in work):
            served_low_at = clock.now
            break
    assert served_low_at is not None, "low never ran while high kept arriving"
    assert served_low_at <= 2 * default_classes()["low"].aging_s + 0.5


def test_deadline_and_cancel_release_pages_at_the_next_step():
    sched, lane, clock = make()
    a, b, c = req("a", "low", deadline=5.0), req("b", "high", max_tokens=100), req("c", "low", deadline=1.0)
    sched.submit(a)
    sched.submit(b)
    run_step(sched)
    assert lane.allocator.num_used > 0
    sched.submit(c)  # still waiting when its deadline passes
    sched.cancel(b)
    clock.now = 5.0
    assert sched.schedule("lane0") == []
    assert lane.allocator.num_used == 0
    assert {r.request_id: r.finish_reason for r in sched.finished} == {"a": "deadline", "b": "cancelled",
                                                                       "c": "deadline"}


def test_chunked_prefill_keeps_decodes_running_during_a_long_prompt():
    sched, lane, clock = make(num_pages=64, budget=16, chunk=8)
    sched.submit(req("short", "high", prompt=4, max_tokens=20))
    run_step(sched)
    sched.submit(req("long", "low", prompt=100, max_tokens=1))
    for _ in range(5):
        work = sched.schedule("lane0")
        assert [w.num_tokens for w in work if w.request.request_id == "short"] == [1]
        assert sum(w.num_tokens for w in work) <= 16
        sched.complete("lane0", work)


def test_full_class_queue_is_refused():
    classes = dict(default_classes())
    classes["low"] = PriorityClass("low", rank=1, ttft_target_s=10, tpot_target_s=1, max_queue=2)
    sched, lane, clock = make(classes=classes)
    sched.submit(req("a", "low"))
    sched.submit(req("b", "low"))
    with pytest.raises(QueueFull, match="bound 2"):
        sched.submit(req("c", "low"))
    sched.submit(req("d", "high"))  # other classes unaffected


def test_requests_finish_with_all_pages_back():
    sched, lane, clock = make(num_pages=8, max_batch=3)
    for i in range(7):
        sched.submit(req(f"r{i}", "high" if i % 3 == 0 else "low", prompt=5 + i, max_tokens=3, arrival=i * 0.01))
    for step in range(200):
        clock.now = step * 0.05
        run_step(sched)
        if len(sched.finished) == 7:
            break
    assert sorted(r.request_id for r in sched.finished) == [f"r{i}" for i in range(7)]
    assert all(r.num_output == 3 for r in sched.finished)
    assert lane.allocator.num_used == 0


def test_scheduler_imports_no_jax():
    import subprocess
    import sys

    code = "import sys, nitsum_jax.scheduler, nitsum_jax.scheduler.controller; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def two_lanes(costs, mover):

    clock = FakeClock()
    a = LaneQueue("a", ("all",), PageAllocator(4, PAGE), 4)
    b = LaneQueue("b", ("low",), PageAllocator(8, PAGE), 4)
    sched = Scheduler(default_classes(), [a, b], clock=clock, costs=costs, mover=mover)
    return sched, a, b, clock


def fill_a_with_low(sched):
    sched.submit(req("low-1", "low", arrival=0.0))
    sched.submit(req("low-2", "low", arrival=0.1))
    sched.complete("a", sched.schedule("a"))  # both prefilled on lane a (b is idle: it is scheduled separately)


def high_arrives_on_full_lane(move_bytes_per_s, recompute_s_per_token, make_mover):
    """Lane a full of low work, then a high request: low-2 is the victim. make_mover(sched) gives
    the scheduler's mover. Returns (sched, a, b, work)."""
    from nitsum_jax.scheduler import CostModel

    sched, a, b, clock = two_lanes(CostModel(move_bytes_per_s=move_bytes_per_s, kv_bytes_per_token=1000,
                                             recompute_s_per_token=recompute_s_per_token), None)
    sched.mover = make_mover(sched)
    fill_a_with_low(sched)
    sched.submit(req("high", "high", arrival=0.2))
    clock.now = 0.2
    return sched, a, b, sched.schedule("a")


def test_victim_is_migrated_when_moving_is_cheaper_than_recomputing():
    moves = []

    def make_mover(sched):
        def mover(request, src, dst):
            lanes = sched.lanes
            lanes[dst].allocator.reserve(request.request_id, lanes[src].allocator.capacity(request.request_id))
            lanes[src].allocator.free(request.request_id)
            moves.append((request.request_id, src, dst))
        return mover

    sched, a, b, work = high_arrives_on_full_lane(1e12, 1e-3, make_mover)
    assert moves == [("low-2", "a", "b")]
    victim = next(r for r in b.running if r.request_id == "low-2")
    assert victim.num_computed == 8 and victim.state is State.RUNNING  # keeps its progress
    assert "high" in [w.request.request_id for w in work]


def test_victim_is_recomputed_when_moving_costs_more():
    def mover(*args):
        raise AssertionError("must not move")

    sched, a, b, work = high_arrives_on_full_lane(1e3, 1e-6, lambda sched: mover)
    victim = next(r for r in sched.waiting if r.request_id == "low-2")
    assert victim.num_computed == 0 and sched.migrations == []


def test_victim_whose_move_fails_is_recomputed_and_its_pages_freed():
    def mover(request, src, dst):
        raise RuntimeError("device transfer failed")  # a failed move leaves the pages on src (PlanSet.move)

    sched, a, b, work = high_arrives_on_full_lane(1e12, 1e-3, lambda sched: mover)
    victim = next(r for r in sched.waiting if r.request_id == "low-2")
    assert victim.num_computed == 0 and victim.state is State.WAITING and sched.migrations == []
    assert "low-2" not in a.allocator and "low-2" not in b.allocator
    assert "high" in [w.request.request_id for w in work]


def test_requests_that_outgrow_the_lane_together_do_not_wait_for_each_other_forever():
    sched, lane, clock = make(num_pages=6, max_batch=4)  # 24 tokens; each request grows to 20
    for i in range(3):
        sched.submit(req(f"low-{i}", "low", prompt=4, max_tokens=16, arrival=float(i)))
    clock.now = 3.0
    for _ in range(200):
        run_step(sched)
        if len(sched.finished) == 3:
            break
    assert sorted(r.request_id for r in sched.finished) == ["low-0", "low-1", "low-2"]
    assert all(r.finish_reason == "length" for r in sched.finished)
    assert lane.allocator.num_used == 0
    # The latest arrivals gave way (recomputed later), the first kept its pages.
    assert "low-0" not in [victim for _, victim, _ in sched.preemption_log]


# --- next_decode: the step planned before the current one completes (chained decode) ---------

def decoding(sched, n=2, max_tokens=10, cls="low"):
    """n requests past their prompt, each with one decode step in flight (scheduled, not completed)."""
    for i in range(n):
        sched.submit(req(f"r{i}", cls, prompt=4, max_tokens=max_tokens))
    run_step(sched)  # prompts: each draws its first token
    return sched.schedule("lane0")  # the decode step now "in flight"


def test_next_decode_plans_one_more_token_per_row_and_reserves_its_page():
    sched, lane, clock = make(num_pages=16)
    work = decoding(sched)
    assert all(w.num_tokens == 1 and w.start_pos == 4 for w in work)
    follow = sched.next_decode("lane0", work)
    assert [(w.request.request_id, w.start_pos, w.num_tokens) for w in follow] == [("r0", 5, 1), ("r1", 5, 1)]
    assert all(lane.allocator.capacity(w.request.request_id) >= 7 for w in follow)  # positions 0..6 fit
    sched.complete("lane0", work)
    sched.complete("lane0", follow)  # as the engine completes them, in order
    assert [r.num_output for r in lane.running] == [3, 3]
    assert sched.schedule("lane0")[0].start_pos == 6  # and the next boundary picks up from there


@pytest.mark.parametrize("blocker", ["waiting", "cancel", "deadline", "length", "prefill"])
def test_next_decode_leaves_the_decision_to_schedule_when_the_boundary_matters(blocker):
    sched, lane, clock = make(num_pages=16)
    work = decoding(sched, max_tokens=2 if blocker == "length" else 10)
    if blocker == "waiting":
        sched.submit(req("new", "low"))  # the lane has a free slot: admit it at the boundary
    elif blocker == "cancel":
        sched.cancel(lane.running[0])
    elif blocker == "deadline":
        lane.running[1].deadline = clock.now
    elif blocker == "prefill":
        work = work[:1]  # a running request that is not in the step (still in its prompt, stalled)
    # "length": the step in flight gives r0 and r1 their last token (max_tokens 2)
    used = lane.allocator.num_used
    assert sched.next_decode("lane0", work) is None
    assert lane.allocator.num_used == used


def test_next_decode_goes_on_when_a_full_lane_cannot_admit_or_preempt_for_the_waiting():
    sched, lane, clock = make(num_pages=32, max_batch=2)
    work = decoding(sched, n=2, cls="low")
    sched.submit(req("low-waiting", "low"))  # full lane, equal class: no preemption
    assert sched.next_decode("lane0", work) is not None
    sched.submit(req("high-waiting", "high"))  # a more urgent class could preempt: stop
    assert sched.next_decode("lane0", work) is None
