"""The fp8 decode kernel (`kernels.fp8_gemm`) where this machine can check it: it lowers (Mosaic
GPU's layout inference and shared-memory budget run at lowering, for the "cuda" platform, on
any host) for the shapes of the presets, and a GPU decode step of fp8 weights calls it for each
of the four layer gemms. Its numbers are checked on a GPU: `bench/gpu_fp8.py` compares its step
with the same step through XLA's gemms (`kernel_check` in its results)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitsum_jax import quant
from nitsum_jax.config import preset
from nitsum_jax.generate import Generator
from nitsum_jax.kernels import fp8_gemm
from nitsum_jax.kv import allocate_kv_cache
from nitsum_jax.model import StepInput, forward, init_params, place
from nitsum_jax.quant import quantize_params
from nitsum_jax.sampling import SamplingParams

MOSAIC = "mosaic_gpu"


def _lowered(f, *args) -> str:
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b"])
@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_kernel_lowers_for_every_layer_gemm_of_a_preset(name, rows, tp):
    """On each device of a lane of `tp`: q/k/v and gate/up cut by output channels, o and down by inputs."""
    cfg = preset(name)
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = [(qkv // tp, cfg.dim, 1), (2 * cfg.ffn_dim // tp, cfg.dim, 1),
              (cfg.dim, cfg.num_heads * cfg.head_dim // tp, 1), (cfg.dim, cfg.ffn_dim // tp, 1)]
    for n, k, pieces in shapes:
        assert fp8_gemm.supported(n, k, rows)
        x = jax.ShapeDtypeStruct((rows, pieces * k), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((cfg.num_layers, pieces, n, k), jnp.float8_e4m3fn)
        text = _lowered(lambda x, w: fp8_gemm.matmul(x, w, jnp.int32(3), pieces=pieces), x, w)
        assert text.count(MOSAIC) >= 1, (n, k)


def test_kernel_declines_what_it_does_not_tile():
    assert not fp8_gemm.supported(100, 4096, 8)  # output channels not a multiple of 64
    assert not fp8_gemm.supported(4096, 4000, 8)  # contracted not a multiple of 128
    assert not fp8_gemm.supported(4096, 4096, 65)  # more rows than a decode batch


def test_splits_fill_the_card_and_keep_pipeline_steps():
    assert fp8_gemm.splits_for(28672, 4096, 1) == 1  # 448 programs already
    assert fp8_gemm.splits_for(4096, 14336, 1) == 4  # 64 output tiles: 256 programs
    assert fp8_gemm.splits_for(6144, 4096, 1) == 4
    # from 32 rows q/k/v takes 2 (the sweep's best); o and down keep 4, gate/up 1
    assert [fp8_gemm.splits_for(n, k, 1, m=32) for n, k in [(6144, 4096), (4096, 4096), (4096, 14336), (28672, 4096)]] \
        == [2, 4, 4, 1]
    for n, k in [(4096, 4096), (6144, 4096), (4096, 14336), (28672, 4096)]:
        s = fp8_gemm.splits_for(n, k, 1)
        assert k % (s * fp8_gemm.TILE_K) == 0 and k // (s * fp8_gemm.TILE_K) >= 4


def _decode_text(monkeypatch, weights: str, batch: int, new: int) -> str:
    cfg = preset("tiny")
    params = place(init_params(cfg, jax.random.key(0), weights=weights))
    kv = allocate_kv_cache(cfg, num_pages=8, page_size=16)
    step = StepInput(tokens=jnp.zeros((batch, new), jnp.int32), start_pos=jnp.zeros((batch,), jnp.int32),
                     num_new=jnp.full((batch,), new, jnp.int32), page_table=jnp.zeros((batch, 4), jnp.int32))
    monkeypatch.setattr(quant, "use_kernel", lambda: True)  # what a GPU backend answers
    return _lowered(lambda p, kv, s: forward(p, kv, s, cfg)[0], params, kv, step)


def test_a_gpu_decode_step_of_fp8_weights_calls_the_kernel_for_each_layer_gemm(monkeypatch):
    # the layer loop's body is traced once: q/k/v, o, gate/up and down, one call each
    assert _decode_text(monkeypatch, "fp8", batch=3, new=1).count(f"@{MOSAIC}") == 4


def test_bf16_steps_and_long_prefills_keep_xla_gemms(monkeypatch):
    assert _decode_text(monkeypatch, "bf16", batch=3, new=1).count(MOSAIC) == 0
    assert _decode_text(monkeypatch, "fp8", batch=1, new=128).count(MOSAIC) == 0  # 128 rows


@pytest.mark.parametrize("exponent", [0, fp8_gemm.DOWN_EXPONENT])
def test_every_bf16_activation_in_the_exponents_range_reaches_the_kernel_exactly(exponent):
    bits = np.arange(2 ** 16, dtype=np.uint16)  # every bf16 value
    x = np.asarray(jnp.asarray(bits).view(jnp.bfloat16), np.float32)
    x = x[np.isfinite(x)]
    back = np.asarray(fp8_gemm.to_float16(jnp.asarray(x, jnp.bfloat16), exponent), np.float32) * 2.0 ** exponent
    mag = np.abs(x)
    exact = (mag >= 2.0 ** (exponent - 17)) & (mag < 2.0 ** (exponent + 16))
    assert exact.sum() > 6000  # most of bf16's normal values within float16's 30 binades and more
    np.testing.assert_array_equal(back[exact], x[exact])
    small = mag < 2.0 ** (exponent - 17)  # rounded to a multiple of 2^(exponent - 24)
    assert float(np.max(np.abs(back[small] - x[small]))) <= 2.0 ** (exponent - 25)
    assert np.all(np.isinf(back[mag >= 2.0 ** (exponent + 16)]))  # beyond: overflow, not a wrong finite value


GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def wide_fp8():
    """The tiny preset with wider heads and ffn, so that a chunk's (or a device's) wo and w_down
    inputs, 128 wide, tile: its config, fp8 params, three prompts and their greedy continuations
    by the single-device fp8 model through XLA's gemms."""
    cfg = dataclasses.replace(preset("tiny"), head_dim=64, ffn_dim=512)
    fp8 = quantize_params(init_params(cfg, jax.random.key(1)))
    rng = np.random.default_rng(0)
    prompts = [[256] + [int(t) for t in rng.integers(0, 256, size=n)] for n in (5, 13, 20)]
    want = Generator(cfg, fp8, page_size=8, max_batch=4, prefill_chunk=16, max_seq_len=64).generate(prompts, GREEDY)
    return cfg, fp8, prompts, want


def _kernel_by_definition(monkeypatch, record) -> list:
    """Steps built from here on take the kernel's path with the kernel replaced by its plain-JAX
    definition (`reference_partial_products`; the kernel runs on a GPU only); returns the list of
    `record(x, keywords)` of each call, made as the programs are traced and partitioned."""
    calls = []

    def reference(x, w, layer, **kw):
        calls.append(record(x, kw))
        return fp8_gemm.reference_partial_products(x, w, layer, **kw)

    monkeypatch.setattr(quant, "use_kernel", lambda: True)  # what a GPU backend answers
    monkeypatch.setattr(fp8_gemm, "partial_products", reference)
    return calls


def _chunked_lane(cfg, params, runs, name):
    from jax.sharding import Mesh

    from nitsum_jax.plans import BucketGrid, Lane
    from nitsum_jax.plans.spec import LaneSpec
    from nitsum_jax.plans.weights import WeightStore

    devices = jax.devices()[:1]
    store = WeightStore.build(cfg, params, runs, devices)
    mesh = Mesh(np.array(devices), ("tp",))
    grid = BucketGrid(decode_batch=(4,), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
    lane = Lane(name, LaneSpec(("all",), 1, (0,)), cfg, runs.layouts[(0,)], mesh, store.lane_params((0,), mesh),
                32, 8, grid)
    lane.compile()
    return lane


@pytest.mark.parametrize("runs_of", [((0, 1, 2, 3),), ((0, 1), (2, 3))])
def test_the_kernels_reshapes_cover_chunked_lanes(monkeypatch, runs_of, wide_fp8):
    """A TP1 lane holding four chunks (one run of all, or two runs of two: a lane of two layer
    groups) through the kernel's path, with the kernel itself replaced by its plain-JAX
    definition (`reference_partial_products`; the kernel runs on a GPU only): the same greedy
    tokens as the single-device fp8 model through XLA's gemms, the kernel path taken."""
    from nitsum_jax.model import ChunkLayout
    from nitsum_jax.plans.layout import WeightRuns

    cfg, fp8, prompts, want = wide_fp8
    calls = _kernel_by_definition(monkeypatch, lambda x, kw: kw["pieces"])
    runs = WeightRuns(runs={0: runs_of}, lanes={(0,): tuple(((i,), len(r)) for i, r in enumerate(runs_of))},
                      layouts={(0,): ChunkLayout(4, ((0, 1, 2, 3),))})
    lane = _chunked_lane(cfg, fp8, runs, f"tp1@0/runs{len(runs_of)}")
    got = Generator(cfg, runner=lane, max_batch=4, prefill_chunk=16, max_seq_len=64).generate(prompts, GREEDY)
    # traced once a program: each group's q/k/v, o, gate/up and down; wo and w_down read `used` pieces
    assert sorted(set(calls)) == sorted({1} | {len(r) for r in runs_of})
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=2e-2)


def test_lanes_of_several_devices_run_the_kernel_on_their_own_part_of_each_weight(monkeypatch, wide_fp8):
    """Every lane of the default plans on 4 devices (TP4; TP2 and TP1 lanes of a shared 4-chunk
    set) through the kernel's path, the kernel replaced by its plain-JAX definition: the fp8
    model's tokens, every layer gemm on the kernel's path, and no weight gathered onto a device
    (each device runs the kernel on its own shard; o and down add their partial sums)."""
    from nitsum_jax.plans import BucketGrid, PlanSet, default_plans

    cfg, fp8, prompts, want = wide_fp8
    shapes = _kernel_by_definition(monkeypatch, lambda x, kw: (x.shape[1], kw["n"], kw["pieces"]))
    grid = BucketGrid(decode_batch=(4,), prefill_len=(16,), max_seq_len=64, min_move_pages=8)
    ps = PlanSet(cfg, fp8, default_plans(4, cfg), num_pages=32, page_size=8, grid=grid)
    # each device's own part: at TP4 q/k/v 384 channels (2 q + 2 k + 2 v heads of 64), o 128 inputs
    assert {(128, 384, 1), (128, 128, 1)} <= {(k, n, p) for k, n, p in shapes} and len(shapes) >= 3 * 4
    for lane in ps.lanes.values():
        got = Generator(cfg, runner=lane, max_batch=4, prefill_chunk=16, max_seq_len=64).generate(prompts, GREEDY)
        for g, w in zip(got, want):
            assert g.token_ids == w.token_ids, lane.name
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=2e-2, err_msg=lane.name)
        if lane.spec.tp > 1:
            hlo = lane._steps[(4, 1)].as_text()
            assert "all-gather" not in hlo and "all-reduce" in hlo, lane.name
