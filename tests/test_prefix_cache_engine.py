"""Prefix caching end to end on 8 host devices: agent chains whose calls share a system prompt
and a growing history give every call its solo tokens under every plan and across plan
switches, while later calls reuse the cached pages of earlier ones."""

import numpy as np
import pytest

from nitsum_jax.engine import Engine
from nitsum_jax.generate import Generator
from nitsum_jax.plans import BucketGrid, default_plans, parse_plans
from nitsum_jax.sampling import SamplingParams
from server_helpers import wait_for

PAGE = 8
GRID = BucketGrid(decode_batch=(1, 4), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_cfg, tiny_params):
    eng = Engine(tiny_cfg, tiny_params, default_plans(8, tiny_cfg), num_pages=48, page_size=PAGE, grid=GRID,
                 initial_plan="static")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def solo(tiny_cfg, tiny_params):
    generator = Generator(tiny_cfg, tiny_params, page_size=PAGE, max_batch=1, prefill_chunk=16, max_seq_len=64)
    return lambda prompt, params=PARAMS: generator.generate([prompt], params)[0].token_ids


def ids(n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


def switch_to(engine, plan):
    engine.switch_plan(plan, reason="test")
    wait_for(lambda: engine.plan_name == plan)


def run_chain(engine, system, tier, seed, calls=3, salt=None):
    """An agent conversation: each call's prompt is the previous prompt, its real answer and a
    new tool result. Returns [(prompt, handle)]."""
    prompt, out = list(system) + ids(4, seed), []
    for k in range(calls):
        handle = engine.submit(prompt, PARAMS, priority_class=tier, cache_salt=salt)
        result = handle.result(timeout=300)
        out.append((prompt, handle))
        prompt = prompt + result.token_ids + ids(4, seed + 100 + k)
    return out


def assert_only_idle_cached_pages_remain(engine):
    wait_for(lambda: all(lane["kv_pages_used"] == 0 for lane in engine.lanes_info()))
    lanes = engine.lanes_info()
    assert all(lane["kv_pages_cached"] <= lane["kv_pages_total"] for lane in lanes)
    assert sum(lane["kv_pages_cached"] for lane in lanes) > 0


@pytest.mark.parametrize("plan", ["static", "mixed", "burst"])
def test_an_agent_chain_gives_solo_tokens_and_reuses_its_history_under_every_plan(engine, solo, plan):
    switch_to(engine, plan)
    system = ids(16, 1)

    chain = run_chain(engine, system, "high", seed=10) + run_chain(engine, system, "low", seed=20)

    for prompt, handle in chain:
        assert handle.result().token_ids == solo(prompt)
    for (prev, before), (prompt, handle) in zip(chain[:2], chain[1:3]):  # the high chain
        # Every full page of the previous call's prompt and answer whose K/V were computed (all
        # but the answer's last token), short of the page of this prompt's last token.
        computed = len(prev) + len(before.result().token_ids) - 1
        assert handle.cached_tokens == min(computed // PAGE, (len(prompt) - 1) // PAGE) * PAGE
        assert handle.cached_tokens > len(prev) // PAGE * PAGE  # the answer's pages were reused too
    # The low chain's first call finds the system prompt where a lane serving low computed it
    # (mixed keeps the urgent tier on a lane of its own). 20 tokens: at most 2 pages are reused.
    assert chain[3][1].cached_tokens == {"static": 16, "mixed": 0, "burst": 16}[plan]
    records = {f.request.request_id: f.cached_tokens for f in engine.recent()}
    assert all(records[h.request.request_id] == h.cached_tokens for _, h in chain)
    assert_only_idle_cached_pages_remain(engine)


def test_plan_switches_while_chains_run_keep_solo_tokens_and_drop_the_caches_of_leaving_lanes(engine, solo):
    switch_to(engine, "static")
    system = ids(16, 2)
    prompts = [(system + ids(3 + i, 30 + i), "high" if i % 3 == 0 else "low") for i in range(9)]
    handles = []
    for i, (prompt, tier) in enumerate(prompts):
        handles.append(engine.submit(prompt, SamplingParams(max_tokens=30, ignore_eos=True), priority_class=tier))
        if i in (3, 6):  # while sequences that share cached pages are mid-generation
            wait_for(lambda: handles[-1].first_token_time is not None)
            engine.switch_plan("mixed" if i == 3 else "burst", reason="test")

    for (prompt, _), handle in zip(prompts, handles):
        assert handle.result(timeout=300).token_ids == solo(prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    assert sum(h.cached_tokens for h in handles) > 0
    assert [(s.from_plan, s.to_plan) for s in engine.switches[-2:]] == [("static", "mixed"), ("mixed", "burst")]
    assert_only_idle_cached_pages_remain(engine)
    in_plan = {lane["name"]: lane for lane in engine.lanes_info() if lane["in_plan"]}
    assert all(lane["kv_pages_cached"] == 0 for lane in engine.lanes_info() if lane["name"] not in in_plan)


def test_requests_under_different_salts_share_no_cached_pages(engine, solo):
    switch_to(engine, "static")
    prompt = ids(40, 3)

    first = engine.submit(prompt, PARAMS, priority_class="low", cache_salt="tenant-a")
    first.result(timeout=300)
    other = engine.submit(prompt, PARAMS, priority_class="low", cache_salt="tenant-b")
    same = engine.submit(prompt, PARAMS, priority_class="low", cache_salt="tenant-a")

    assert other.result(timeout=300).token_ids == same.result(timeout=300).token_ids == solo(prompt)
    assert first.cached_tokens == other.cached_tokens == 0
    assert same.cached_tokens == 32


def test_stats_report_hit_rates_by_tier_and_lane(engine):
    switch_to(engine, "static")
    system = ids(16, 4)
    for seed in (50, 51):
        engine.submit(system + ids(5, seed), PARAMS, priority_class="low").result(timeout=300)

    stats = engine.stats()["prefix_cache"]

    assert stats["enabled"] is True
    lane = engine.plan_set.plans["static"].lanes[0].name
    assert stats["by_lane"][lane]["cached_tokens"] >= 16 and 0 < stats["by_tier"]["low"]["hit_rate"] < 1
    assert stats["cached_pages"][lane] > 0


def test_with_the_cache_off_every_prompt_is_computed_and_tokens_are_the_same(tiny_cfg, tiny_params, solo):
    eng = Engine(tiny_cfg, tiny_params, parse_plans("one: high+low=tp1@0"), num_pages=32, page_size=PAGE,
                 grid=GRID, prefix_cache=False)
    try:
        chain = run_chain(eng, ids(16, 5), "low", seed=60, calls=2)
        assert all(h.result().token_ids == solo(p) for p, h in chain)
        assert all(h.cached_tokens == 0 for _, h in chain)
        assert eng.stats()["prefix_cache"]["enabled"] is False
        assert all(lane["kv_pages_cached"] == 0 for lane in eng.lanes_info())
    finally:
        eng.close()
