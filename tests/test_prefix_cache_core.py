"""The engine core's side of prefix caching, with fake lanes and no JAX: prompt keys under a
salt, keys of generated pages chained on from the prompt's, a whole conversation reused by its
next call, and the caches of lanes that leave the plan or fail."""

import numpy as np

from fakes import FakeLane
from nitsum_jax.engine.core import EngineCore
from nitsum_jax.pages import PageAllocator, page_keys
from nitsum_jax.plans.spec import parse_plans
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.scheduler import default_classes

PAGE = 4


def make_core(plan_text="one: all=tp1@0; two: all=tp1@1", **kw):
    plans = parse_plans(plan_text)
    lanes = {s.name: FakeLane(s.name, s, PageAllocator(32, PAGE)) for p in plans for s in p.lanes}
    return EngineCore(default_classes(), plans, lanes, prefill_chunk=16, token_budget=64, **kw), lanes


def run(core, lane, rid, now=0.0, tokens=()):
    """Step `lane` until `rid` ends; the fake device draws `tokens` in order (then 7s)."""
    drawn = iter(tokens)
    for _ in range(100):
        work = core.next_step(lane, now)
        out = [next(drawn, 7) for _ in work]
        core.step_done(lane, work, [(work, out, [-0.1] * len(work))], 0.01, now)
        if any(e.request.request_id == rid for e in core.take_finished(now)):
            return
    raise AssertionError(f"{rid} did not finish")


def prompt(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def test_generated_pages_are_keyed_as_the_chain_of_the_whole_sequence():
    core, _ = make_core()
    entry = core.submit("a", prompt(6, 1), SamplingParams(max_tokens=7, ignore_eos=True), 0, "low", 0.0,
                        cache_salt="t")
    keyed = []
    for token in (11, 12, 13, 14, 15, 16):
        work = core.next_step("tp1@0", 0.0)
        core.step_done("tp1@0", work, [(work, [token], [-0.1])], 0.01, 0.0)
        keyed.append(len(entry.request.page_keys))

    assert keyed == [1, 2, 2, 2, 2, 3]  # 7 to 12 tokens: a key each time a page of 4 fills
    assert list(entry.request.page_keys) == page_keys(entry.seq.all_ids, PAGE, "t")


def test_the_next_call_of_a_conversation_reuses_the_previous_prompt_and_answer():
    core, _ = make_core()
    first = prompt(10, 2)
    core.submit("call-1", first, SamplingParams(max_tokens=6, ignore_eos=True), 0, "high", 0.0)
    run(core, "tp1@0", "call-1", tokens=[21, 22, 23, 24, 25, 26])
    answer = [21, 22, 23, 24, 25, 26]

    nxt = core.submit("call-2", first + answer + prompt(3, 3), SamplingParams(max_tokens=2, ignore_eos=True),
                      0, "high", 1.0)
    work = core.next_step("tp1@0", 1.0)

    # 16 tokens were in the cache's pages (the answer's last token was never fed back: 15
    # computed), so 3 full pages of 4 are reused.
    assert nxt.request.cached_tokens == 12 and work[0].start_pos == 12


def test_different_salts_give_different_prompt_keys_and_the_cache_off_gives_none():
    core, _ = make_core()
    ids = prompt(9, 4)

    assert core.prompt_keys(ids, "a") != core.prompt_keys(ids, "b")
    assert core.prompt_keys(ids) == page_keys(ids, PAGE)
    off, _ = make_core(prefix_cache=False)
    assert off.prompt_keys(ids, "a") == []


def test_a_switch_drops_the_idle_cached_pages_of_the_lanes_that_leave_and_keeps_the_rest():
    core, lanes = make_core("one: all=tp1@0, all=tp1@1; two: all=tp1@1")
    core.submit("a", prompt(12, 5), SamplingParams(max_tokens=2, ignore_eos=True), 0, "low", 0.0)
    run(core, "tp1@0", "a")
    core.submit("b", prompt(12, 6), SamplingParams(max_tokens=2, ignore_eos=True), 0, "low", 0.0)
    run(core, "tp1@1", "b")
    assert lanes["tp1@0"].allocator.num_cached == lanes["tp1@1"].allocator.num_cached == 3

    plan = core.begin_switch("two")
    core.end_switch("two", "test", plan, 0, 0, 0.0, 0.0, 1.0)

    assert lanes["tp1@0"].allocator.num_cached == 0
    assert lanes["tp1@1"].allocator.num_cached == 3


def test_a_failed_lane_drops_its_idle_cached_pages():
    core, lanes = make_core("one: all=tp1@0; two: all=tp1@1")
    core.submit("a", prompt(12, 7), SamplingParams(max_tokens=2, ignore_eos=True), 0, "low", 0.0)
    run(core, "tp1@0", "a")
    assert lanes["tp1@0"].allocator.num_cached == 3

    core.lane_failed("tp1@0", RuntimeError("device lost"))

    assert lanes["tp1@0"].allocator.num_cached == 0
    stats = core.prefix_stats()
    assert stats["enabled"] and stats["by_lane"]["tp1@0"]["requests"] == 1
