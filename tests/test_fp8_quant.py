"""fp8 weights (nitsum_jax.quant) on one host device: rounding bounds, the quantized matmul, and
the tiny model's logits, greedy tokens and memory against the unquantized model's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitsum_jax.generate import Generator
from nitsum_jax.kv import allocate_kv_cache
from nitsum_jax.model import StepInput, abstract_params
from nitsum_jax.plans import parse_plans
from nitsum_jax.plans.layout import assign_chunks
from nitsum_jax.plans.memory import MemoryBudget, memory_report
from nitsum_jax.quant import (CONTRACTED, FP8, Fp8Weight, WeightFormatError, dequantize, matmul, quantize,
                              quantize_params, weights_format, with_weights)
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.steps import step_logits

# e4m3 keeps 3 mantissa bits: rounding to nearest moves a value by at most 2^-4 of itself; below
# the smallest normal (2^-6 in q units) the step is the subnormal one, 2^-9, so at most 2^-10 * scale.
REL_STEP = 2.0**-4


@pytest.fixture(scope="module")
def fp8_params(tiny_params):
    return quantize_params(tiny_params)


def test_quantized_weight_is_within_half_an_e4m3_step_of_the_original():
    w = jax.random.normal(jax.random.key(0), (3, 64, 4, 16)) * jnp.logspace(-3, 1, 16)  # channels of 4 decades
    fp8 = quantize(w, CONTRACTED["wq"])
    assert fp8.q.dtype == FP8 and fp8.scale.shape == (3, 1, 4, 16) and fp8.scale.dtype == jnp.float32
    err = np.abs(np.asarray(dequantize(fp8, jnp.float32) - w))
    bound = np.maximum(REL_STEP * np.abs(np.asarray(w)), np.asarray(fp8.scale) * 2.0**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    # each channel's largest |w| maps to e4m3's largest value, 448, exactly
    np.testing.assert_allclose(np.abs(np.asarray(fp8.q, np.float32)).max(axis=1), 448.0)


def test_all_zero_channel_quantizes_to_zeros_with_a_finite_scale():
    w = jnp.zeros((2, 8, 5)).at[:, :, 1:].set(jax.random.normal(jax.random.key(1), (2, 8, 4)))
    fp8 = quantize(w, CONTRACTED["w_gate"])
    assert np.isfinite(np.asarray(fp8.scale)).all()
    assert (np.asarray(dequantize(fp8, jnp.float32))[:, :, 0] == 0).all()


def test_quantized_matmul_equals_the_matmul_of_the_dequantized_weight():
    # wo contracts two axes (heads, head_dim): its scale is one per model-dim column
    x = jax.random.normal(jax.random.key(2), (2, 3, 4, 16))  # [B, T, N, H]
    fp8 = quantize(jax.random.normal(jax.random.key(3), (4, 16, 32)), tuple(a - 1 for a in CONTRACTED["wo"]))
    got = matmul("BTNH,NHD->BTD", x, fp8)
    want = jnp.einsum("BTNH,NHD->BTD", x, dequantize(fp8, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_unquantized_matmul_is_the_plain_einsum_bit_for_bit():
    x = jax.random.normal(jax.random.key(4), (2, 3, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(5), (16, 24)).astype(jnp.bfloat16)
    assert (np.asarray(matmul("BTD,DF->BTF", x, w)) == np.asarray(jnp.einsum("BTD,DF->BTF", x, w))).all()


def test_only_linear_weights_are_quantized_and_the_tree_matches_its_declaration(tiny_cfg, fp8_params):
    chunk = fp8_params.chunks[0]
    assert all(isinstance(getattr(chunk, n), Fp8Weight) for n in CONTRACTED)
    assert chunk.embed.dtype == chunk.lm_head.dtype == fp8_params.final_norm.dtype == tiny_cfg.jnp_dtype
    want = abstract_params(tiny_cfg, weights="fp8")
    assert jax.tree.structure(want) == jax.tree.structure(fp8_params)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), want, fp8_params))
    assert weights_format(fp8_params) == "fp8" and weights_format(want) == "fp8"


def test_upcasting_an_fp8_model_gives_its_dequantized_weights(tiny_params, fp8_params):
    back = with_weights(fp8_params, "bf16")
    assert weights_format(back) == "bf16"
    np.testing.assert_array_equal(np.asarray(back.chunks[0].w_up),
                                  np.asarray(dequantize(fp8_params.chunks[0].w_up, jnp.float32)))
    assert with_weights(fp8_params, "auto") is fp8_params


def test_unknown_weight_format_is_refused_naming_the_choices(tiny_params):
    with pytest.raises(WeightFormatError, match=r"'int4'.*\['auto', 'bf16', 'fp8'\]"):
        with_weights(tiny_params, "int4")


def prefill_logits(cfg, params, ids) -> np.ndarray:
    kv = allocate_kv_cache(cfg, 16, 8)
    step = StepInput(tokens=np.asarray(ids, np.int32)[None], start_pos=np.array([0], np.int32),
                     num_new=np.array([len(ids)], np.int32), page_table=np.arange(8, dtype=np.int32)[None])
    return np.asarray(step_logits(params, kv, step, cfg)[0][0])


def test_fp8_logits_are_within_one_e4m3_step_of_the_logit_scale(tiny_cfg, tiny_params, fp8_params):
    """Each weight is off by up to 2^-4 of itself (RMS ~2^-4/sqrt(3)), so each matmul output is off
    by ~3.6% RMS, and the two-layer model's logits measure ~4% RMS; the worst logit must stay
    within 2^-4 of the largest (a missing or misplaced scale is off by orders of magnitude)."""
    ids = np.random.default_rng(0).integers(0, 256, size=48)
    want, got = prefill_logits(tiny_cfg, tiny_params, ids), prefill_logits(tiny_cfg, fp8_params, ids)
    assert np.abs(got - want).max() <= REL_STEP * np.abs(want).max()
    assert not np.array_equal(got, want)  # the fp8 model really runs on its own weights


def test_fp8_picks_the_unquantized_greedy_token_wherever_that_token_leads_clearly(tiny_cfg, tiny_params,
                                                                                  fp8_params):
    """Along the unquantized model's own greedy continuations (teacher-forced), the fp8 model's
    argmax is the same token wherever the unquantized top-2 margin exceeds twice the logit bound
    above. The random tiny model's logits are nearly flat (top-2 margins ~0.1 of the logit
    scale), so free-running continuations part after a few tokens on near-ties; at clear margins
    they must agree, and a fifth of the positions at least are clear."""
    rng = np.random.default_rng(1)
    prompts = [[256] + [int(t) for t in rng.integers(0, 256, size=n)] for n in (5, 9, 13, 17)]
    gen = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=4, prefill_chunk=32, max_seq_len=64)
    outs = gen.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    clear_positions = 0
    for prompt, out in zip(prompts, outs):
        ids = prompt + out.token_ids
        want = prefill_logits(tiny_cfg, tiny_params, ids)[len(prompt) - 1:-1]  # [24, V]: the greedy picks
        got = prefill_logits(tiny_cfg, fp8_params, ids)[len(prompt) - 1:-1]
        assert (want.argmax(-1) == np.asarray(out.token_ids)).all()
        top2 = np.sort(want, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * REL_STEP * np.abs(want).max()
        assert (got.argmax(-1)[clear] == want.argmax(-1)[clear]).all()
        clear_positions += clear.sum()
    assert clear_positions >= 0.2 * sum(len(o.token_ids) for o in outs)


def test_memory_report_shows_linear_weights_at_half_their_bf16_bytes(tiny_cfg):
    cfg = tiny_cfg.replace(dtype="bfloat16")
    plans = parse_plans("one: all=tp1@0")
    budget = MemoryBudget(num_pages=16, page_size=8, max_batch=4, max_prefill=16)

    def weights(fmt):
        return memory_report(cfg, plans, assign_chunks(plans, cfg), budget, fmt)["devices"][0]["weights"]

    def linear_bytes(fmt):
        chunk = abstract_params(cfg, weights=fmt).chunks[0]
        return sum(a.size * a.dtype.itemsize for n in CONTRACTED for a in jax.tree.leaves(getattr(chunk, n)))

    # the report counts exactly the arrays declared: the rest unchanged, the linear weights at one
    # byte a value plus a float32 scale per output channel (tiny: 128-256 wide, so ~half + 2-3%)
    assert weights("bf16") - weights("fp8") == linear_bytes("bf16") - linear_bytes("fp8")
    assert 0.5 < linear_bytes("fp8") / linear_bytes("bf16") < 0.55


def test_fp8_on_a_gpu_asks_for_triton_gemms_and_warns_once_where_it_is_slower(tiny_params, fp8_params, caplog):
    from types import SimpleNamespace

    from nitsum_jax.quant import _warn_fp8_speed, step_options

    gpu, cpu = [SimpleNamespace(platform="gpu")], [SimpleNamespace(platform="cpu")]
    _warn_fp8_speed.cache_clear()
    with caplog.at_level("WARNING", logger="nitsum_jax"):
        assert step_options(tiny_params, gpu) == {} and step_options(fp8_params, cpu) == {}
        assert not caplog.records  # bf16 anywhere, fp8 on a CPU: nothing to say
        assert step_options(fp8_params, gpu) == step_options(fp8_params, gpu) == {"xla_gpu_enable_triton_gemm": True}
    assert len(caplog.records) == 1 and "copy each layer's fp8 slice" in caplog.records[0].getMessage()
