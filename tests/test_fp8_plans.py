"""fp8 weights on 8 host devices: every lane of every default plan computes the single-device fp8
model from shared fp8 buffers, serving compiles nothing, the memory report agrees with the
buffers, random fp8 weights are the quantized random weights, and an engine serves fp8."""

import jax
import numpy as np
import pytest

from nitsum_jax.generate import Generator
from nitsum_jax.model import CHUNK_AXIS, GROUP_INPUTS, ChunkLayout, abstract_params, inputs_first
from nitsum_jax.plans import BucketGrid, PlanSet, default_plans, parse_plans
from nitsum_jax.plans.layout import WeightRuns
from nitsum_jax.plans.weights import WeightStore, chunk_slice
from nitsum_jax.quant import CONTRACTED, Fp8Weight, quantize, quantize_params
from nitsum_jax.sampling import SamplingParams

GRID = BucketGrid(decode_batch=(4,), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [[256] + [int(t) for t in rng.integers(0, 256, size=n)] for n in (5, 13, 20)]


@pytest.fixture(scope="module")
def fp8_params(tiny_params):
    return quantize_params(tiny_params)


@pytest.fixture(scope="module")
def fp8_set(tiny_cfg, fp8_params):
    return PlanSet(tiny_cfg, fp8_params, default_plans(8, tiny_cfg), num_pages=32, page_size=8, grid=GRID)


def lane_generator(cfg, lane):
    return Generator(cfg, runner=lane, max_batch=4, prefill_chunk=16, max_seq_len=64)


def test_every_lane_of_every_plan_matches_the_single_device_fp8_model(tiny_cfg, fp8_params, fp8_set):
    want = Generator(tiny_cfg, fp8_params, page_size=8, max_batch=4, prefill_chunk=16,
                     max_seq_len=64).generate(prompts(), GREEDY)
    for plan in fp8_set.plans:
        for lane in fp8_set.lanes_of(plan):
            assert isinstance(lane.params.groups[0].wqkv, Fp8Weight) and lane.params.chunks[0].wq is None
            for got, ref in zip(lane_generator(tiny_cfg, lane).generate(prompts(), GREEDY), want):
                assert got.token_ids == ref.token_ids, (plan, lane.name)
                np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5, err_msg=f"{plan} {lane.name}")


def test_nothing_compiles_after_start_up_with_fp8_weights(tiny_cfg, fp8_set):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
    lanes = list(fp8_set.lanes.values())
    for lane in lanes:
        lane_generator(tiny_cfg, lane).generate(prompts(1), SamplingParams(max_tokens=3, temperature=0.7, seed=1))
    gen = lane_generator(tiny_cfg, lanes[0])
    seq = gen.new_sequence("m", prompts()[1], GREEDY)
    lanes[0].allocator.reserve("m", seq.max_total_len)
    gen.prefill(seq)
    for src, dst in zip(lanes, lanes[1:]):
        fp8_set.move("m", src, dst)
    lanes[-1].allocator.free("m")
    assert compiles == []


def test_memory_report_agrees_with_the_fp8_buffers_held(fp8_set):
    report = fp8_set.memory_report()
    held = fp8_set.weights.bytes_per_device()
    assert report["weights_format"] == "fp8"
    assert {d: use["weights"] for d, use in report["devices"].items()} == held
    assert report["weight_overhead"] == pytest.approx(1.0)


def _placed(group, chunk: int, name: str, q_heads: int):
    """Chunk `chunk`'s piece of weight `name` in a placed run (`model.LayerGroup`, tp axis of one);
    q, k and v are read back out of the fused `wqkv`, gate and up out of `w_gate_up`, a shared
    scale (wo, w_down) is the run's one. fp8 values are read in the weight's own axis order
    (the placed form stores their input axes last, `model.inputs_first`)."""
    group = group.replace(**{f: inputs_first(getattr(group, f)) if isinstance(getattr(group, f), Fp8Weight)
                             else getattr(group, f) for f in GROUP_INPUTS})

    def piece(a):
        a = np.asarray(a)[:, 0]
        return a[:, min(chunk, a.shape[1] - 1)]
    if name in ("w_gate", "w_up"):  # [layers, dim, 2, ffn per chunk]
        return jax.tree.map(lambda a: piece(a)[:, :, ("w_gate", "w_up").index(name)], group.w_gate_up)
    if name not in ("wq", "wk", "wv"):
        return jax.tree.map(piece, getattr(group, name))

    def part(a):
        a = piece(a)  # [layers, dim, q + 2 kv heads, head_dim]
        kv = (a.shape[2] - q_heads) // 2
        start, stop = {"wq": (0, q_heads), "wk": (q_heads, q_heads + kv), "wv": (q_heads + kv, a.shape[2])}[name]
        return a[:, :, start:stop]
    return jax.tree.map(part, group.wqkv)


def test_random_fp8_weights_are_the_random_weights_quantized_whole(tiny_cfg):
    """Chunks of wo and w_down split their input: each must hold the scale of the whole weight
    (one replicated array on a lane), as quantizing the unsplit weight gives."""
    one_run = WeightRuns(runs={0: ((0, 1, 2, 3),)}, lanes={(0,): (((0,), 4),)},
                         layouts={(0,): ChunkLayout(4, ((0, 1, 2, 3),))})
    devices = jax.devices()[:1]
    dense = WeightStore.random(tiny_cfg, one_run, devices, seed=5)
    fp8 = WeightStore.random(tiny_cfg, one_run, devices, seed=5, weights="fp8")
    assert fp8.weights_format == "fp8" and dense.weights_format == "bf16"
    for name, contracted in CONTRACTED.items():
        axis = CHUNK_AXIS[name]
        q_heads = tiny_cfg.num_heads // 4
        whole = np.concatenate([np.asarray(_placed(dense.runs[(0, 0)], c, name, q_heads)) for c in range(4)],
                               axis=axis)
        want = jax.tree.map(np.asarray, quantize(whole, contracted))
        for c in range(4):
            got = _placed(fp8.runs[(0, 0)], c, name, q_heads)
            np.testing.assert_array_equal(np.asarray(got.q, np.float32),
                                          chunk_slice(tiny_cfg, name, want.q, c, 4).astype(np.float32), err_msg=name)
            np.testing.assert_array_equal(np.asarray(got.scale), chunk_slice(tiny_cfg, name, want.scale, c, 4))


def test_abstract_fp8_params_give_a_plan_set_of_random_fp8_weights(tiny_cfg):
    ps = PlanSet(tiny_cfg, abstract_params(tiny_cfg, weights="fp8"), parse_plans("pair: all=tp2@0-1"),
                 devices=jax.devices()[:2], num_pages=16, page_size=8,
                 grid=BucketGrid(decode_batch=(1,), prefill_len=(16,), max_seq_len=32, min_move_pages=4))
    assert ps.weights.weights_format == "fp8"
    lane = next(iter(ps.lanes.values()))
    [out] = lane_generator(tiny_cfg, lane).generate([prompts()[0]], GREEDY)
    assert len(out.token_ids) == GREEDY.max_tokens


def test_engine_built_with_fp8_weights_serves_a_request():
    from nitsum_jax.engine import Engine

    engine = Engine.build(preset="tiny", plans="solo: all=tp1@0", num_devices=1, weights="fp8", num_pages=16,
                          page_size=8, grid=BucketGrid(decode_batch=(1,), prefill_len=(16,), max_seq_len=32,
                                                       min_move_pages=4))
    try:
        assert engine.plan_set.memory_report()["weights_format"] == "fp8"
        done = engine.submit(prompts()[0], SamplingParams(max_tokens=5, ignore_eos=True)).result(timeout=120)
        assert len(done.token_ids) == 5
    finally:
        engine.close()
