"""End to end on 8 host devices: a mixed high/low stream with plan switches forced mid-run."""

import time

import numpy as np
import pytest

from nitsum_jax.engine import Engine
from nitsum_jax.generate import Generator
from nitsum_jax.kv import kv_bytes_per_page
from nitsum_jax.plans import BucketGrid, default_plans
from nitsum_jax.sampling import SamplingParams

GRID = BucketGrid(decode_batch=(1, 4), prefill_len=(16,), max_seq_len=64, min_move_pages=8)


@pytest.fixture(scope="module")
def engine(tiny_cfg, tiny_params):
    eng = Engine(tiny_cfg, tiny_params, default_plans(8, tiny_cfg), num_pages=48, page_size=8, grid=GRID,
                 initial_plan="static")
    yield eng
    eng.close()


def workload(seed=0, n=12):
    rng = np.random.default_rng(seed)
    return [([256] + [int(t) for t in rng.integers(0, 256, size=int(rng.integers(3, 20)))],
             "high" if i % 3 == 0 else "low") for i in range(n)]


def test_mixed_stream_with_plan_switches_gives_every_request_its_solo_tokens(tiny_cfg, tiny_params, engine):
    check_switches_keep_solo_tokens(tiny_cfg, tiny_params, engine)


def test_plan_switches_during_chained_decode_keep_solo_tokens(tiny_cfg, tiny_params):
    eng = Engine(tiny_cfg, tiny_params, default_plans(8, tiny_cfg), num_pages=48, page_size=8, grid=GRID,
                 initial_plan="static", chain_steps=8)
    try:
        check_switches_keep_solo_tokens(tiny_cfg, tiny_params, eng)
        assert sum(eng.stats()["chained_steps"].values()) > 0
    finally:
        eng.close()


def check_switches_keep_solo_tokens(tiny_cfg, tiny_params, engine):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    solo = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=1, prefill_chunk=16, max_seq_len=64)
    items = workload()
    handles = []
    for i, (prompt, cls) in enumerate(items):
        handles.append(engine.submit(prompt, params, priority_class=cls))
        if i in (4, 8):
            # Switch while sequences are mid-generation, so their pages must move (or recompute).
            while handles[-1].first_token_time is None:
                time.sleep(0.001)
            engine.switch_plan("mixed" if i == 4 else "burst", reason="test")
    results = [h.result(timeout=300) for h in handles]
    for (prompt, _), got in zip(items, results):
        assert got.token_ids == solo.generate([prompt], params)[0].token_ids
        assert got.finish_reason == "length"
    switches = [(s["from_plan"], s["to_plan"]) for s in engine.stats()["plan_switches"]]
    assert switches == [("static", "mixed"), ("mixed", "burst")]
    assert sum(s["moved"] for s in engine.stats()["plan_switches"]) >= 1
    per_token = kv_bytes_per_page(tiny_cfg, 1)
    for s in engine.stats()["plan_switches"]:  # the log carries each switch's KV-move bytes and time
        assert (s["moved_bytes"] > 0) == (s["moved"] > 0) == (s["move_s"] > 0)
        assert s["moved_bytes"] % (8 * per_token) == 0  # whole pages of 8 tokens
    time.sleep(0.1)
    assert all(v == 0 for v in engine.stats()["pages_in_use"].values())


def test_streamed_tokens_arrive_one_by_one_and_match_the_result(engine):
    handle = engine.submit([256, 10, 20, 30], SamplingParams(max_tokens=6, ignore_eos=True), priority_class="high")
    streamed = list(handle)
    assert streamed == handle.result(timeout=60).token_ids and len(streamed) == 6


def test_cancel_stops_the_request_and_frees_its_pages(engine):
    handle = engine.submit([256, 1, 2, 3], SamplingParams(max_tokens=60, ignore_eos=True), priority_class="low")
    next(iter(handle))
    handle.cancel()
    out = handle.result(timeout=60)
    assert out.finish_reason == "cancelled" and len(out.token_ids) < 60
    time.sleep(0.1)
    assert all(v == 0 for v in engine.stats()["pages_in_use"].values())


def test_stats_report_per_class_latency_and_queues(engine):
    engine.generate([[256, 5, 6]], SamplingParams(max_tokens=3, ignore_eos=True), priority_class="high")
    stats = engine.stats()
    assert stats["classes"]["high"]["completed"] >= 1
    assert stats["classes"]["high"]["ttft_p99_s"] > 0
    assert set(stats["queue"]) == {"high", "low"}


def test_adaptive_controller_switches_to_the_reserved_plan_when_high_work_arrives(tiny_cfg, tiny_params):
    from nitsum_jax.scheduler.controller import PlanController

    plans = default_plans(8, tiny_cfg)
    grid = BucketGrid(decode_batch=(4,), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
    eng = Engine(tiny_cfg, tiny_params, plans, num_pages=32, page_size=8, grid=grid, initial_plan="burst",
                 controller=PlanController(plans, "burst", hold_s=0.0, min_dwell_s=0.0))
    try:
        handles = [eng.submit([256, i, i + 1], SamplingParams(max_tokens=30, ignore_eos=True), priority_class="high")
                   for i in range(4)]
        results = [h.result(timeout=300) for h in handles]
        assert all(len(r.token_ids) == 30 for r in results)
        assert ("burst", "mixed") in [(s.from_plan, s.to_plan) for s in eng.switches]
        assert all(s.reason for s in eng.switches)
    finally:
        eng.close()


def test_high_preempts_low_whose_kv_moves_to_another_lane_and_tokens_stay_exact(tiny_cfg, tiny_params):
    from nitsum_jax.plans import parse_plans

    # Plan `one` has only lane A, so both lows start there; plan `two` adds an empty lane B.
    plans = parse_plans("one: high+low=tp4@0-3; two: high+low=tp4@0-3, low=tp4@4-7")
    grid = BucketGrid(decode_batch=(1, 2), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
    eng = Engine(tiny_cfg, tiny_params, plans, num_pages=8, page_size=8, grid=grid)  # 64 tokens a lane
    solo = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=1, prefill_chunk=16, max_seq_len=64)
    try:
        low_params = SamplingParams(max_tokens=23, ignore_eos=True)  # 9 + 23 tokens: 4 pages each, A full
        lows = [eng.submit([256] + list(range(1 + i, 9 + i)), low_params, priority_class="low") for i in range(2)]
        while not all(h.first_token_time for h in lows):
            time.sleep(0.001)
        eng.switch_plan("two")
        while eng.plan_name != "two":
            time.sleep(0.001)
        assert {h.request.lane for h in lows} == {"tp4@0-3"}
        high = eng.submit([256, 7, 7, 7], SamplingParams(max_tokens=8, ignore_eos=True), priority_class="high")
        results = [h.result(timeout=120) for h in lows + [high]]
        for h, got in zip(lows + [high], results):
            assert got.token_ids == solo.generate([h.seq.prompt_ids], h.seq.params)[0].token_ids
        assert high.served_by == ("two", "tp4@0-3", 4)
        assert eng.stats()["preemptions"] >= 1
        assert eng.scheduler.migrations and eng.scheduler.migrations[0][2:] == ("tp4@0-3", "tp4@4-7")
        assert all(lane["kv_pages_used"] == 0 for lane in eng.lanes_info())
    finally:
        eng.close()


@pytest.mark.parametrize("chain_steps", [0, 8])  # 8: chained decode, the accelerator default, mid-chain
def test_a_failing_lane_is_marked_unhealthy_and_its_requests_finish_exactly_elsewhere(tiny_cfg, tiny_params,
                                                                                      chain_steps):
    from nitsum_jax.plans import parse_plans
    from nitsum_jax.scheduler.controller import PlanController

    plans = parse_plans("two: all=tp2@0-1, all=tp2@2-3; one: all=tp2@2-3")
    grid = BucketGrid(decode_batch=(2,), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
    eng = Engine(tiny_cfg, tiny_params, plans, num_pages=16, page_size=8, grid=grid, chain_steps=chain_steps,
                 controller=PlanController(plans, "two", hold_s=60.0, min_dwell_s=60.0))
    solo = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=1, prefill_chunk=16, max_seq_len=64)
    try:
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        handles = [eng.submit([256, 3 * i + 1, 5, 9, 2 * i], params, priority_class="low") for i in range(4)]
        while not all(h.first_token_time for h in handles):
            time.sleep(0.001)
        eng.inject_fault("tp2@0-1")
        results = [h.result(timeout=120) for h in handles]
        for h, got in zip(handles, results):
            assert got.token_ids == solo.generate([h.seq.prompt_ids], params)[0].token_ids
            assert got.finish_reason == "length"
        stats = eng.stats()
        assert "tp2@0-1" in stats["unhealthy"] and "injected" in stats["unhealthy"]["tp2@0-1"]
        assert {i["name"]: i["healthy"] for i in stats["lanes"]} == {"tp2@0-1": False, "tp2@2-3": True}
        assert stats["plan"] == "one" and "failed" in stats["plan_switches"][-1]["reason"]
        assert all(lane["kv_pages_used"] == 0 for lane in stats["lanes"])
        assert eng.controller.current == "one" and not eng.controller.usable(eng.plan_set.plans["two"])
    finally:
        eng.close()


def test_stats_report_lane_busy_time_and_the_plan_history(engine):
    engine.reset_stats()
    engine.generate([[256, 4, 4, 4]], SamplingParams(max_tokens=4, ignore_eos=True), priority_class="low")
    stats = engine.stats()
    assert sum(stats["steps"].values()) >= 4
    assert 0.0 < stats["device_busy_fraction"] <= 1.0
    assert stats["plan_history"][0][1] == stats["plan"]
    assert all(lane["decode_step_s"] is None or lane["decode_step_s"] > 0 for lane in stats["lanes"])


def test_engine_builds_from_a_preset_with_a_compact_plan_set():
    eng = Engine.build(preset="tiny", plans="s: all=tp2@0-1; m: high=tp1@0, low=tp1@1", num_devices=2,
                       num_pages=16, page_size=8, grid=BucketGrid(decode_batch=(2,), prefill_len=(16,),
                                                                  max_seq_len=64, min_move_pages=8))
    try:
        out = eng.generate(["hi there"], SamplingParams(max_tokens=5, ignore_eos=True), priority_class="high")
        assert len(out[0].token_ids) == 5 and out[0].text is not None
        assert sorted(eng.plan_set.plans) == ["m", "s"]
        assert 0.0 <= eng.core.slo_attainment()["high"] <= 1.0
    finally:
        eng.close()


def test_chained_decode_steps_give_the_unchained_tokens_and_free_every_page(tiny_cfg, tiny_params):
    """Chained decode (the next step dispatched before this one's tokens are read, fed on the
    device) is the default on accelerators; here it is forced on host devices. Rows that EOS,
    a stop string or max_tokens end mid-chain, and a cancel mid-chain, must change nothing."""
    plans = "static: all=tp1@0"
    grid = BucketGrid(decode_batch=(4, 8), prefill_len=(16,), max_seq_len=96)
    rng = np.random.default_rng(3)
    prompts = [[256] + [int(t) for t in rng.integers(0, 256, size=int(rng.integers(3, 12)))] for _ in range(10)]
    params = [SamplingParams(max_tokens=20 + 5 * i, temperature=0.9 if i % 2 else 0.0, seed=i,
                             stop=("e",) if i == 3 else (), ignore_eos=i % 3 == 0) for i in range(10)]
    results = {}
    for chain in (0, 6):
        eng = Engine.build(preset="tiny", plans=plans, num_devices=1, chain_steps=chain, grid=grid, num_pages=96,
                           page_size=8)
        try:
            handles = [eng.submit(p, sp) for p, sp in zip(prompts, params)]
            results[chain] = [(h.result(timeout=120).token_ids, h.result().text, h.result().finish_reason)
                              for h in handles]
            assert (sum(eng.stats()["chained_steps"].values()) > 0) == (chain > 0)
            if chain:
                victim = eng.submit(prompts[0], SamplingParams(max_tokens=70, ignore_eos=True))
                while len(victim.seq.output_ids) < 5:
                    time.sleep(0.001)
                victim.cancel()
                assert victim.result(timeout=60).finish_reason == "cancelled"
            deadline = time.time() + 30
            while eng.scheduler.pages_in_use()["tp1@0"] and time.time() < deadline:
                time.sleep(0.01)
            assert eng.scheduler.pages_in_use() == {"tp1@0": 0}
        finally:
            eng.close()
    assert results[6] == results[0]
    assert {r[2] for r in results[0]} >= {"length"}


def test_switch_cost_probe_moves_kv_between_lane_kinds_and_leaves_the_engine_as_it_was(engine):
    prompt = [256, 9, 8, 7, 6]
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    before = engine.generate([prompt], greedy, priority_class="low")[0].token_ids
    plan, switches = engine.plan_name, len(engine.stats()["plan_switches"])
    probe = engine.measure_switch_costs(repeats=2)
    assert set(probe["switch_ms"]) == {f"{plan}->{p}" for p in engine.plan_set.plans if p != plan} | \
        {f"{p}->{plan}" for p in engine.plan_set.plans if p != plan}
    assert 0.0 <= probe["switch_ms_median"] <= probe["switch_ms_max"]
    kinds = {(m["src"], m["dst"]) for m in probe["moves"]}
    tps = {lane.name: lane.spec.tp for lane in engine.plan_set.lanes.values()}
    assert len(probe["moves"]) >= 3 and len({(tps[a], tps[b]) for a, b in kinds}) >= 3  # across TP degrees
    for move in probe["moves"]:
        assert move["contents_equal"], move
        assert move["tokens"] == GRID.max_seq_len and move["GB_per_s"] > 0
        assert move["MB"] * 1e6 == kv_bytes_per_page(engine.cfg, 1) * move["tokens"]
    # nothing left behind: same plan, no probe switches in the stats, every page free, same tokens
    assert engine.plan_name == plan and len(engine.stats()["plan_switches"]) == switches
    assert all(lane.allocator.num_used == 0 for lane in engine.plan_set.lanes.values())
    assert engine.generate([prompt], greedy, priority_class="low")[0].token_ids == before


def test_switch_cost_probe_refuses_a_busy_engine(engine):
    handle = engine.submit([256, 5, 5], SamplingParams(max_tokens=40, ignore_eos=True), priority_class="low")
    try:
        with pytest.raises(RuntimeError, match="idle engine"):
            engine.measure_switch_costs(repeats=1)
    finally:
        handle.result(timeout=120)


def test_a_switch_whose_kv_moves_fail_recomputes_the_sequences_and_keeps_their_tokens(tiny_cfg, tiny_params):
    """The GPU transport fails at every move (a CUDA error): the switch still happens, the moving
    sequences are recomputed on the new plan's lanes, tokens are the solo run's, no page is kept."""
    from nitsum_jax.plans import parse_plans
    from test_peer_pages import FailingTransport

    plans = parse_plans("one: high+low=tp4@0-3; two: high=tp2@4-5, low=tp2@6-7")
    eng = Engine(tiny_cfg, tiny_params, plans, num_pages=24, page_size=8, grid=GRID, initial_plan="one")
    failing = FailingTransport()
    eng.plan_set.peer_mover = failing
    eng.plan_set.use_transport("direct")
    solo = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=1, prefill_chunk=16, max_seq_len=64)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    try:
        items = workload(seed=3, n=4)
        handles = [eng.submit(prompt, params, priority_class=cls) for prompt, cls in items]
        while not all(h.first_token_time for h in handles):
            time.sleep(0.001)
        eng.switch_plan("two", reason="test")
        results = [h.result(timeout=300) for h in handles]
        for (prompt, _), got in zip(items, results):
            assert got.token_ids == solo.generate([prompt], params)[0].token_ids
        (switch,) = eng.stats()["plan_switches"]
        assert failing.calls >= 1 and switch["moved"] == 0 and switch["recomputed"] >= failing.calls
        time.sleep(0.1)
        assert all(v == 0 for v in eng.stats()["pages_in_use"].values())
    finally:
        eng.close()
