"""Plans on 8 host devices: every lane computes the single-device model, weights are shared,
KV moves between TP degrees keep sequences exact, and serving compiles nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitsum_jax.generate import Generator
from nitsum_jax.plans import BucketGrid, PlanError, PlanSet, default_plans, parse_plans, read_plans
from nitsum_jax.plans.spec import load_plans_toml
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.settings import Settings

GRID = BucketGrid(decode_batch=(1, 4), prefill_len=(16,), max_seq_len=64)
PAGE_SIZE = 8
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
# Lanes of degree 8, 4, 2 (on two device pairs) and 1: every direction of move the issue names.
MOVE_PLANS = "big: all=tp8@0-7; mix: high=tp4@0-3, low=tp2@4-5, low=tp1@6, low=tp1@7; pair: low=tp2@0-1, low=tp2@2-3"


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [[256] + [int(t) for t in rng.integers(0, 256, size=n)] for n in (5, 13, 20)]


@pytest.fixture(scope="module")
def reference(tiny_cfg, tiny_params):
    gen = Generator(tiny_cfg, tiny_params, page_size=PAGE_SIZE, max_batch=4, prefill_chunk=16, max_seq_len=64)
    return gen.generate(prompts(), GREEDY)


@pytest.fixture(scope="module")
def default_set(tiny_cfg, tiny_params):
    return PlanSet(tiny_cfg, tiny_params, default_plans(8, tiny_cfg), num_pages=48, page_size=PAGE_SIZE, grid=GRID)


@pytest.fixture(scope="module")
def move_set(tiny_cfg, tiny_params):
    return PlanSet(tiny_cfg, tiny_params, parse_plans(MOVE_PLANS), num_pages=48, page_size=PAGE_SIZE, grid=GRID)


def lane_generator(cfg, lane):
    return Generator(cfg, runner=lane, max_batch=4, prefill_chunk=16, max_seq_len=64)


def test_default_plan_set_has_static_mixed_and_all_device_low_plans(tiny_cfg):
    plans = {p.name: p for p in default_plans(8, tiny_cfg)}
    assert [lane.tp for lane in plans["static"].lanes] == [8]
    assert sorted(lane.tp for lane in plans["mixed"].lanes) == [2, 2, 4]
    assert plans["mixed"].lanes[0].classes == ("high",)
    assert sorted(plans["burst"].devices) == list(range(8))
    assert all(lane.serves("low") for lane in plans["burst"].lanes)


def test_every_lane_of_every_default_plan_matches_the_single_device_model(tiny_cfg, default_set, reference):
    for plan in default_set.plans:
        for lane in default_set.lanes_of(plan):
            outs = lane_generator(tiny_cfg, lane).generate(prompts(), GREEDY)
            for got, want in zip(outs, reference):
                assert got.token_ids == want.token_ids, (plan, lane.name)
                np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, err_msg=f"{plan} {lane.name}")
            assert lane.allocator.num_used == 0


def test_sampled_rows_on_lanes_match_the_single_device_model(tiny_cfg, tiny_params, default_set):
    """Lanes draw sampled rows in a second program after a greedy step (no conditional in the
    step); the tokens and log-probabilities must be those of the single-device model's one-program
    step, for a batch mixing greedy and sampled rows with top-k and top-p."""
    mixed = [SamplingParams(max_tokens=10, ignore_eos=True),
             SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, seed=7),
             SamplingParams(max_tokens=10, ignore_eos=True, temperature=1.3, top_k=20, top_p=0.9, seed=3)]
    gen = Generator(tiny_cfg, tiny_params, page_size=PAGE_SIZE, max_batch=4, prefill_chunk=16, max_seq_len=64)
    want = gen.generate(prompts(1), mixed)
    assert want[1].token_ids != gen.generate(prompts(1), [mixed[0]] * 3)[1].token_ids  # rows really sample
    tp = {lane.spec.tp: lane for plan in default_set.plans for lane in default_set.lanes_of(plan)}
    for lane in (tp[min(tp)], tp[max(tp)]):
        got = lane_generator(tiny_cfg, lane).generate(prompts(1), mixed)
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids, lane.name
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, err_msg=lane.name)
        assert lane.allocator.num_used == 0


def test_lanes_share_weight_buffers_across_plans(default_set):
    report = default_set.memory_report()
    assert report["weight_overhead"] == pytest.approx(1.0)
    tp8 = default_set.lanes[tuple(range(8))]
    tp4 = default_set.lanes[(0, 1, 2, 3)]
    tp2 = default_set.lanes[(0, 1)]

    def buffers(lane):
        return {s.data.unsafe_buffer_pointer() for group in lane.params.groups
                for w in jax.tree.leaves(group) for s in w.addressable_shards if s.device == jax.devices()[0]}

    # Device 0 holds chunks {0,1,2,3} for the TP2 lane in ONE buffer per weight (a run of four
    # chunks); the TP4 and TP8 lanes read the first two and the first of them in place.
    assert buffers(tp8) == buffers(tp4) == buffers(tp2)
    assert len(buffers(tp2)) == 4  # wqkv, wo, w_gate_up, w_down
    assert [g.used for g in tp2.params.groups] == [4] and [g.used for g in tp8.params.groups] == [1]
    assert tp2.params.groups[0].chunks_held == tp8.params.groups[0].chunks_held == 4


def test_memory_report_agrees_with_the_arrays_held(default_set):
    report = default_set.memory_report()
    held = default_set.weights.bytes_per_device()
    kv_held = {}
    for lane in default_set.lanes.values():
        for arr in (lane.kv.k, lane.kv.v):
            for s in arr.addressable_shards:
                kv_held[s.device.id] = kv_held.get(s.device.id, 0) + s.data.nbytes
    for d, use in report["devices"].items():
        assert use["weights"] == held[d]
        assert use["kv"] == kv_held[d]


@pytest.mark.parametrize("packed", [True, False], ids=["packed-route", "piece-by-piece"])
def test_moved_sequence_continues_with_the_tokens_and_nll_of_an_unmoved_run(tiny_cfg, move_set, reference, packed,
                                                                           monkeypatch):
    lanes = move_set.lanes
    assert len(move_set.routes) == len(lanes) * (len(lanes) - 1)  # every pair has a packed route
    if not packed:
        monkeypatch.setattr(move_set, "routes", {})
    route = [lanes[(0, 1, 2, 3)], lanes[(4, 5)], lanes[(0, 1, 2, 3)], lanes[(0, 1)], lanes[(4, 5)], lanes[(6,)],
             lanes[tuple(range(8))], lanes[(7,)], lanes[(2, 3)]]  # tp4>2>4, tp2>tp2, tp2>1, tp1>8>1, tp1>2
    walk_moves(tiny_cfg, move_set, route, reference[2])


def walk_moves(cfg, plan_set, route, want):
    """Prefill on route[0], then move lane to lane along `route`, one decode step on each: the
    tokens and teacher-forced NLL must be those of the run that never moved."""
    gen = lane_generator(cfg, route[0])
    seq = gen.new_sequence("moving", prompts()[2], GREEDY)
    route[0].allocator.reserve(seq.seq_id, seq.max_total_len)
    gen.prefill(seq)
    for src, dst in zip(route, route[1:]):
        pages_before = src.allocator.num_used
        moved = plan_set.move(seq.seq_id, src, dst)
        assert moved > 0 and src.allocator.num_used == pages_before - len(dst.allocator.pages(seq.seq_id))
        assert seq.seq_id not in src.allocator
        gen.runner = dst
        gen.decode([seq])
    assert seq.output_ids == want.token_ids[:len(seq.output_ids)]
    assert len(seq.output_ids) == len(route)
    nll = -np.sum(seq.output_logprobs)
    np.testing.assert_allclose(nll, -np.sum(want.logprobs[:len(route)]), rtol=1e-5)
    route[-1].allocator.free(seq.seq_id)


def test_moves_with_page_copy_kernels_in_pieces_keep_tokens_and_nll(tiny_cfg, tiny_params, reference):
    """The GPU path of a move (Pallas page copies, here in interpret mode), sent in pieces."""
    interpret = Settings.from_env({"NITSUM_MOVE_COPY": "interpret"})
    plans = parse_plans("big: all=tp4@0-3; mix: high=tp2@0-1, low=tp1@2, low=tp1@3; pair: low=tp2@0-1, low=tp2@2-3")
    ps = PlanSet(tiny_cfg, tiny_params, plans, num_pages=24, page_size=PAGE_SIZE, move_pieces=2,
                 grid=BucketGrid(decode_batch=(1,), prefill_len=(16,), max_seq_len=64, min_move_pages=2),
                 settings=interpret)
    lanes = ps.lanes
    assert {lane.move_copy for lane in lanes.values()} == {"interpret"}
    route = [lanes[(0, 1, 2, 3)], lanes[(0, 1)], lanes[(0, 1, 2, 3)], lanes[(2,)], lanes[(0, 1)], lanes[(2, 3)],
             lanes[(3,)], lanes[(0, 1, 2, 3)]]  # tp4>2>4>1>2>2(other devices)>1>4
    walk_moves(tiny_cfg, ps, route, reference[2])


def test_nothing_compiles_after_start_up(tiny_cfg, move_set):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
    for lane in move_set.lanes.values():
        lane_generator(tiny_cfg, lane).generate(prompts(3), SamplingParams(max_tokens=4, temperature=0.7, seed=1))
    lanes = list(move_set.lanes.values())
    gen = lane_generator(tiny_cfg, lanes[0])
    seq = gen.new_sequence("m", prompts()[1], GREEDY)
    lanes[0].allocator.reserve("m", seq.max_total_len)
    gen.prefill(seq)
    for src, dst in zip(lanes, lanes[1:]):
        move_set.move("m", src, dst)
    lanes[-1].allocator.free("m")
    assert compiles == []


@pytest.mark.parametrize("text, message", [
    ("a: x=tp4@0-3, y=tp2@3-4", "device 3 is in two lanes"),
    ("a: x=tp2@7-8", "device 8 is outside 0-7"),
    ("a: x=tp4@0-2", "tp4 needs 4 devices"),
    ("a: x=tp16@0-15", "tp16 does not divide the 8 attention heads"),
    ("a: x=tp3@0-2", "power of two"),
    ("a x=tp2@0-1", "must be 'NAME: lane"),
    ("a: high=tp2", "is not CLASSES=tpN@DEVICES"),
    ("a: x=tp1@0; a: x=tp1@1", "unique"),
])
def test_bad_plans_are_refused_with_the_reason(tiny_cfg, text, message):
    with pytest.raises(PlanError, match=message):
        read_plans(text, 8, tiny_cfg)


def test_tp_that_does_not_divide_heads_is_refused(tiny_cfg):
    with pytest.raises(PlanError, match="does not divide the 4 attention heads"):
        read_plans("a: x=tp8@0-7", 8, tiny_cfg.replace(num_heads=4, num_kv_heads=4))


def test_plans_read_from_toml(tmp_path, tiny_cfg):
    path = tmp_path / "plans.toml"
    path.write_text('[[plan]]\nname = "static"\nlanes = ["all=tp8@0-7"]\n'
                    '[[plan]]\nname = "mixed"\nlanes = ["high=tp4@0-3", "low=tp2@4-5", "low=tp2@6-7"]\n')
    plans = read_plans(str(path), 8, tiny_cfg)
    assert plans == load_plans_toml(path) == parse_plans(
        "static: all=tp8@0-7; mixed: high=tp4@0-3, low=tp2@4-5, low=tp2@6-7")


def test_plan_set_that_does_not_fit_the_device_is_refused():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "nitsum_jax.cli", "--devices", "8", "plans", "--preset",
                          "llama-3.1-70b", "--device-memory-gib", "40"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "needs" in out.stderr and "GiB" in out.stderr and "has 40.00 GiB" in out.stderr


def test_converted_gqa_model_with_replicated_kv_heads_matches_on_every_lane(tmp_path):
    from checkpoints_tools.hf import convert_hf
    from checkpoints_tools.store import load_params, read_config
    from hf_models import make_hf_llama

    make_hf_llama(tmp_path / "hf", tie=False, seed=3)
    convert_hf(tmp_path / "hf", tmp_path / "ours", progress=False)
    cfg = read_config(tmp_path / "ours")
    assert cfg.num_kv_heads == 2  # TP4 and TP8 lanes replicate kv heads
    params = load_params(tmp_path / "ours", cfg)
    want = Generator(cfg, params, page_size=PAGE_SIZE, max_batch=4, prefill_chunk=16, max_seq_len=64).generate(
        prompts(4), GREEDY)
    plan_set = PlanSet(cfg, params, default_plans(8, cfg), num_pages=32, page_size=PAGE_SIZE,
                       grid=BucketGrid(decode_batch=(4,), prefill_len=(16,), max_seq_len=64, min_move_pages=8))
    for lane in plan_set.lanes.values():
        outs = lane_generator(cfg, lane).generate(prompts(4), GREEDY)
        for got, ref in zip(outs, want):
            assert got.token_ids == ref.token_ids, lane.name
            np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)


def test_packed_move_programs_carry_bf16_pages_as_words_bit_exactly():
    from nitsum_jax.attention import KVCache
    from nitsum_jax.plans.lane import _gather_words, _scatter_words

    keys = jax.random.split(jax.random.key(0), 4)
    shape = (2, 3, 2, 10, 4, 8)  # [positions, layers, kv_heads, pages, page_size, head_dim]
    src = KVCache(k=jax.random.normal(keys[0], shape).astype(jnp.bfloat16),
                  v=jax.random.normal(keys[2], shape).astype(jnp.bfloat16))
    src_pages, dst_pages = jnp.array([7, 2, 5]), jnp.array([1, 4, 9])
    buffer = _gather_words(src, src_pages, jnp.array([0, 1]))
    assert buffer.dtype == jnp.uint32 and buffer.shape[-1] == shape[-1] // 2
    dst = KVCache(k=jnp.full(shape, 3.0, jnp.bfloat16), v=jnp.full(shape, 3.0, jnp.bfloat16))
    out = _scatter_words(dst, dst_pages, (buffer,), jnp.array([[1, 0]]))  # positions swapped on the way
    assert out.k[0].dtype == jnp.bfloat16
    assert jnp.array_equal(out.k[0][:, :, dst_pages], src.k[1][:, :, src_pages])
    assert jnp.array_equal(out.v[1][:, :, dst_pages], src.v[0][:, :, src_pages])
    assert jnp.array_equal(out.k[1][:, :, dst_pages], src.k[0][:, :, src_pages])
    assert jnp.all(jnp.delete(out.k[0], dst_pages, axis=2) == 3.0)  # other pages untouched
