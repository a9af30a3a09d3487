"""Prefix caching in the scheduler, with a fake clock and no model: what a request reuses at
admission, which lane admits it, what it leaves cached, how eviction and tenants behave."""

import numpy as np

from fakes import FakeClock
from nitsum_jax.pages import PageAllocator, page_keys
from nitsum_jax.scheduler import LaneQueue, Request, Scheduler, default_classes

PAGE = 4


def make(lanes=("lane0",), num_pages=32, max_batch=4, budget=64, chunk=16):
    queues = [LaneQueue(name, ("all",), PageAllocator(num_pages, PAGE), max_batch) for name in lanes]
    return Scheduler(default_classes(), queues, clock=FakeClock(), token_budget=budget, prefill_chunk=chunk), queues


def tokens(n, seed):
    return np.random.default_rng(seed).integers(0, 1000, n).tolist()


def req(rid, prompt, cls="low", max_tokens=2, salt=None, arrival=0.0):
    return Request(rid, cls, len(prompt), max_tokens, arrival, page_keys=tuple(page_keys(prompt, PAGE, salt)))


def run_to_end(sched, rid, lane="lane0", steps=50):
    """Step `lane` until `rid` finishes; returns the work of every step."""
    log = []
    for _ in range(steps):
        work = sched.schedule(lane)
        sched.complete(lane, work)
        log.append(work)
        if any(r.request_id == rid for r in sched.finished):
            return log
    raise AssertionError(f"{rid} did not finish in {steps} steps")


def first_work(sched, rid, lane="lane0"):
    return next(w for w in sched.schedule(lane) if w.request.request_id == rid)


def test_a_request_with_a_cached_prefix_starts_after_its_cached_pages_and_shares_them():
    sched, (lane,) = make()
    system = tokens(16, 1)
    sched.submit(req("first", system + tokens(5, 2)))
    run_to_end(sched, "first")
    assert lane.allocator.num_used == 0 and lane.allocator.num_cached == 5

    sched.submit(second := req("second", system + tokens(7, 3)))
    work = first_work(sched, "second")

    assert (work.start_pos, work.num_tokens) == (16, 7)  # the system prompt's 4 pages are reused
    assert second.cached_tokens == 16
    assert lane.allocator.num_cached == 1  # the first request's fifth page stays idle, unmatched


def test_a_partially_matching_prefix_reuses_exactly_its_full_matching_pages():
    sched, (lane,) = make()
    prompt = tokens(20, 4)
    sched.submit(req("a", prompt))
    run_to_end(sched, "a")
    a_pages = lane.allocator.match(page_keys(prompt, PAGE))

    diverging = prompt[:10] + [prompt[10] + 1] + prompt[11:]  # differs inside page 2
    sched.submit(req("b", diverging))
    work = first_work(sched, "b")

    assert work.start_pos == 8
    assert lane.allocator.pages("b")[:2] == a_pages[:2]
    assert not set(lane.allocator.pages("b")[2:]) & set(a_pages)


def test_a_fully_cached_prompt_still_computes_its_last_page_so_the_step_draws_a_token():
    sched, (lane,) = make()
    prompt = tokens(16, 5)  # exactly 4 full pages
    sched.submit(req("a", prompt))
    run_to_end(sched, "a")

    sched.submit(again := req("again", prompt))
    work = first_work(sched, "again")

    assert (work.start_pos, work.num_tokens) == (12, 4)
    assert again.cached_tokens == 12
    written = lane.allocator.pages("again")[3]
    assert lane.allocator.refs(written) == 1  # the page it writes is its own


def test_requests_of_different_salts_never_hit_each_others_pages():
    sched, (lane,) = make()
    prompt = tokens(24, 6)
    sched.submit(req("tenant-a", prompt, salt="a"))
    run_to_end(sched, "tenant-a")

    sched.submit(other := req("tenant-b", prompt, salt="b"))
    sched.submit(same := req("tenant-a-again", prompt, salt="a"))
    work = {w.request.request_id: w for w in sched.schedule("lane0")}

    assert other.cached_tokens == 0 and work["tenant-b"].start_pos == 0
    assert same.cached_tokens == 20 and work["tenant-a-again"].start_pos == 20


def test_computed_prompt_pages_are_shared_while_the_request_still_runs():
    sched, (lane,) = make(chunk=8)
    prompt = tokens(30, 7)
    sched.submit(req("long", prompt, max_tokens=20))
    for _ in range(5):  # the whole prompt and a few tokens; "long" keeps decoding
        sched.complete("lane0", sched.schedule("lane0"))
    assert lane.allocator.num_keyed == 7

    sched.submit(follower := req("follower", prompt + tokens(3, 8)))
    sched.schedule("lane0")

    assert follower.cached_tokens == 28
    assert lane.allocator.pages("follower")[:7] == lane.allocator.pages("long")[:7]


def test_a_request_goes_to_the_lane_holding_its_prefix():
    sched, (a, b) = make(lanes=("A", "B"))
    system = tokens(32, 9)
    sched.submit(req("warm", system + tokens(2, 10)))
    run_to_end(sched, "warm", lane="B")

    sched.submit(req("next", system + tokens(6, 11)))

    assert sched.schedule("A") == []  # A defers: B would compute 6 tokens, A all 38
    work = first_work(sched, "next", lane="B")
    assert work.start_pos == 32


def test_a_loaded_lane_holding_the_prefix_loses_to_an_idle_lane_by_the_prefill_it_would_wait_for():
    sched, (a, b) = make(lanes=("A", "B"), budget=16, chunk=16, num_pages=64)
    system = tokens(8, 12)
    sched.submit(req("warm", system + tokens(2, 13)))
    run_to_end(sched, "warm", lane="B")
    sched.submit(req("busy", tokens(60, 14), max_tokens=8))
    sched.schedule("B")  # B now has 44 prompt tokens still to compute
    assert sched.prefill_steps(b, sched.lanes["B"].running[0], 0) > 0

    sched.submit(nxt := req("next", system + tokens(8, 15)))
    # B: (44 queued + 8 uncached) / 16 = 3.25 steps; A: (0 + 16) / 16 = 1 step.
    work = first_work(sched, "next", lane="A")

    assert work.start_pos == 0 and nxt.lane == "A" and nxt.cached_tokens == 0


def test_equal_estimates_go_to_the_lane_that_asks():
    sched, (a, b) = make(lanes=("A", "B"))
    system = tokens(8, 16)
    sched.submit(req("warm-A", system + tokens(2, 17)))
    run_to_end(sched, "warm-A", lane="A")
    sched.can_admit = lambda name: name != "A"  # so that B computes the prefix too, not defers to A
    sched.submit(req("warm-B", system + tokens(2, 17)))
    run_to_end(sched, "warm-B", lane="B")
    sched.can_admit = lambda name: True

    sched.submit(req("next", system + tokens(3, 18)))

    assert first_work(sched, "next", lane="A").start_pos == 8


def test_an_urgent_request_evicts_the_least_urgent_tiers_cached_pages_first():
    sched, (lane,) = make(num_pages=8, chunk=32)
    high_prompt, low_prompt = tokens(12, 19), tokens(12, 20)
    sched.submit(req("high-1", high_prompt, cls="high"))
    run_to_end(sched, "high-1")
    sched.submit(req("low-1", low_prompt))
    run_to_end(sched, "low-1")
    assert lane.allocator.num_cached == 6 and lane.allocator.num_free == 8

    sched.submit(req("high-2", tokens(20, 21), cls="high", max_tokens=1))  # 5 pages: 2 free, 3 evicted
    sched.schedule("lane0")

    assert lane.allocator.match(page_keys(low_prompt, PAGE)) == []
    assert len(lane.allocator.match(page_keys(high_prompt, PAGE))) == 3


def test_cached_pages_are_evicted_before_any_running_request_is_preempted():
    sched, (lane,) = make(num_pages=6)
    sched.submit(req("cached", tokens(16, 22)))
    run_to_end(sched, "cached")
    sched.submit(req("low", tokens(8, 23), max_tokens=10))
    sched.complete("lane0", sched.schedule("lane0"))

    sched.submit(req("high", tokens(12, 24), cls="high"))
    sched.schedule("lane0")

    assert sched.preemption_log == []
    assert {r.request_id for r in lane.running} == {"low", "high"}


def test_hit_rates_are_reported_by_tier_and_lane():
    sched, (lane,) = make()
    system = tokens(16, 25)
    for i, cls in enumerate(("low", "low", "high")):
        sched.submit(req(f"r{i}", system + tokens(4, 26 + i), cls=cls))
        run_to_end(sched, f"r{i}")

    stats = sched.prefix_stats()

    assert stats["by_tier"]["low"] == {"requests": 2, "prompt_tokens": 40, "cached_tokens": 16, "hit_rate": 0.4}
    assert stats["by_tier"]["high"]["cached_tokens"] == 16
    assert stats["by_lane"]["lane0"]["requests"] == 3
    assert stats["total"]["hit_rate"] == 32 / 60


def test_without_page_keys_nothing_is_cached_or_reused():
    sched, (lane,) = make()
    prompt = tokens(16, 30)
    for rid in ("a", "b"):
        sched.submit(Request(rid, "low", len(prompt), 2, 0.0))
        run_to_end(sched, rid)

    assert lane.allocator.num_keyed == 0
    assert sched.prefix_stats()["total"]["cached_tokens"] == 0
