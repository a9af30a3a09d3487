"""The Pallas paged-attention kernel, run in interpret mode on CPU, equals the plain-JAX reference."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nitsum_jax.attention import paged_attention_reference
from nitsum_jax.kernels import paged_attention, paged_attention_kernel

LAYERS, NUM_PAGES, HEAD_DIM, POSITIONS = 2, 24, 16, 2  # POSITIONS: chunk positions of a lane


def make_case(seed, *, batch, new_tokens, kv_heads, group, page_size, pages_per_seq, lengths, dtype):
    """Random cache and queries; sequence b holds `lengths[b]` cached tokens before the new ones,
    on distinct random (non-contiguous) physical pages."""
    rng = np.random.default_rng(seed)
    cache_shape = (POSITIONS, LAYERS, kv_heads, NUM_PAGES, page_size, HEAD_DIM)
    k_cache = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    v_cache = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    q = jnp.asarray(rng.standard_normal((batch, new_tokens, POSITIONS, kv_heads * group, HEAD_DIM)), dtype)
    positions = jnp.asarray(np.asarray(lengths)[:, None] + np.arange(new_tokens)[None, :], jnp.int32)
    page_table = jnp.asarray(np.stack([rng.permutation(NUM_PAGES)[:pages_per_seq] for _ in range(batch)]),
                             jnp.int32)
    return q, k_cache, v_cache, positions, page_table


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


CASES = {
    # name: (batch, new_tokens, kv_heads, group, page_size, pages_per_seq, lengths)
    "decode_gqa_partial_pages": (3, 1, 2, 4, 4, 8, [0, 9, 30]),
    "decode_mha": (2, 1, 2, 1, 8, 4, [5, 17]),
    "chunked_prefill_gqa": (1, 12, 2, 2, 4, 8, [7]),
    "prefill_from_zero_mha": (2, 9, 1, 1, 8, 3, [0, 11]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_kernel_matches_reference(name, dtype, tol):
    batch, new_tokens, kv_heads, group, page_size, pages_per_seq, lengths = CASES[name]
    q, k_cache, v_cache, positions, page_table = make_case(
        list(CASES).index(name), batch=batch, new_tokens=new_tokens, kv_heads=kv_heads, group=group,
        page_size=page_size, pages_per_seq=pages_per_seq, lengths=lengths, dtype=dtype)
    layer = jnp.int32(LAYERS - 1)
    out = paged_attention_kernel(q, k_cache, v_cache, layer, positions, page_table, block_n=16, interpret=True)
    # The reference on the same values upcast to fp32: the exact answer for bf16 inputs (and the
    # CPU backend of jax 0.10.2 cannot run some bf16 x bf16 -> f32 dots of the reference).
    f32 = [x.astype(jnp.float32) for x in (q, k_cache, v_cache)]
    ref = paged_attention_reference(*f32, layer, positions, page_table)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("num_splits", [1, 4])
def test_kv_splits_merge_to_the_same_result(num_splits):
    """Flash-decoding splits (including splits with no keys) merge exactly."""
    q, k_cache, v_cache, positions, page_table = make_case(
        7, batch=2, new_tokens=1, kv_heads=2, group=2, page_size=4, pages_per_seq=16, lengths=[3, 50],
        dtype=jnp.float32)
    out = paged_attention_kernel(q, k_cache, v_cache, jnp.int32(1), positions, page_table, block_n=16,
                                 num_splits=num_splits, interpret=True)
    ref = paged_attention_reference(q, k_cache, v_cache, jnp.int32(1), positions, page_table)
    assert rel_err(out, ref) < 1e-5


def test_pages_past_the_positions_are_not_read():
    """Poisoning every page beyond the last position's page changes nothing: they are never read
    (not even the rest of the last block of positions, which shares a load with used pages)."""
    q, k_cache, v_cache, positions, page_table = make_case(
        11, batch=1, new_tokens=1, kv_heads=1, group=2, page_size=4, pages_per_seq=8, lengths=[6],
        dtype=jnp.float32)
    unused = page_table[0, 2:]  # position 6 lives on logical page 1
    k_poisoned = k_cache.at[:, :, :, unused].set(jnp.nan)
    v_poisoned = v_cache.at[:, :, :, unused].set(jnp.nan)
    out = paged_attention_kernel(q, k_poisoned, v_poisoned, jnp.int32(0), positions, page_table, block_n=16,
                                 interpret=True)
    ref = paged_attention_reference(q, k_cache, v_cache, jnp.int32(0), positions, page_table)
    assert rel_err(out, ref) < 1e-5


def test_every_layer_reads_its_own_slice():
    q, k_cache, v_cache, positions, page_table = make_case(
        13, batch=1, new_tokens=2, kv_heads=2, group=2, page_size=4, pages_per_seq=4, lengths=[5],
        dtype=jnp.float32)
    outs = [paged_attention_kernel(q, k_cache, v_cache, jnp.int32(i), positions, page_table, block_n=16,
                                   interpret=True) for i in range(LAYERS)]
    for i, out in enumerate(outs):
        ref = paged_attention_reference(q, k_cache, v_cache, jnp.int32(i), positions, page_table)
        assert rel_err(out, ref) < 1e-5
    assert rel_err(outs[0], outs[1]) > 1e-2


def test_dispatcher_impls_agree_and_auto_is_reference_on_cpu():
    q, k_cache, v_cache, positions, page_table = make_case(
        17, batch=2, new_tokens=1, kv_heads=2, group=2, page_size=4, pages_per_seq=4, lengths=[2, 10],
        dtype=jnp.float32)
    args = (q, k_cache, v_cache, jnp.int32(1), positions, page_table)
    ref = paged_attention_reference(*args)
    np.testing.assert_array_equal(paged_attention(*args, impl="auto"), ref)
    assert rel_err(paged_attention(*args, impl="interpret"), ref) < 1e-5
    with pytest.raises(ValueError, match="impl="):
        paged_attention(*args, impl="triton")


def test_kernel_runs_per_kv_head_shard_inside_a_scanned_tp_step():
    """Under jit with head-sharded inputs (as lanes run), the kernel runs on each device's own kv
    heads inside `lax.scan`: same result as the reference, output head-sharded, no all-gather."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    q, k_cache, v_cache, positions, page_table = make_case(
        19, batch=2, new_tokens=1, kv_heads=2, group=2, page_size=4, pages_per_seq=4, lengths=[3, 12],
        dtype=jnp.float32)
    q_layers = jnp.stack([q * (i + 1) for i in range(LAYERS)])  # [layers, B, T, R, N, H]

    def step(impl):
        def f(q_layers, k_cache, v_cache, positions, page_table):
            def layer(carry, xs):
                q, i = xs
                return carry, paged_attention(q, k_cache, v_cache, i, positions, page_table, impl=impl)
            return jax.lax.scan(layer, 0, (q_layers, jnp.arange(LAYERS, dtype=jnp.int32)))[1]
        return jax.jit(f)

    kv_sharding = NamedSharding(mesh, PartitionSpec(None, None, "tp"))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = (jax.device_put(q_layers, NamedSharding(mesh, PartitionSpec(None, None, None, None, "tp"))),
            jax.device_put(k_cache, kv_sharding), jax.device_put(v_cache, kv_sharding),
            jax.device_put(positions, replicated), jax.device_put(page_table, replicated))
    out = step("interpret")(*args)
    ref = step("reference")(*args)
    assert rel_err(out, ref) < 1e-5
    assert out.sharding.spec == PartitionSpec(None, None, None, None, "tp")
    assert "all-gather" not in step("interpret").lower(*args).compile().as_text()


def test_page_copy_kernels_gather_and_scatter_whole_pages_exactly():
    from nitsum_jax.kernels.page_copy import gather_pages_kernel, scatter_pages_kernel

    shape = (3, 2, 2, 12, 4, 8)  # [positions, layers, kv_heads, pages, page_size, head_dim]
    k, v = (jax.random.normal(jax.random.key(i), shape).astype(jnp.bfloat16) for i in range(2))
    pages = jnp.array([3, 7, 1, 11, 0, 5, 12, 12], jnp.int32)  # the last two are padding (>= pages)
    # pieces: K of position 2, V of position 0, K of position 1 (positions are an input array)
    packed = gather_pages_kernel((k, v), pages, jnp.array([2, 0, 1]), kinds=(0, 1, 0), interpret=True)
    assert packed.shape == (3, 2, 2, 8, 4, 8)
    for a, (src, r) in enumerate(((k, 2), (v, 0), (k, 1))):
        assert jnp.array_equal(packed[a, :, :, :6], src[r][:, :, pages[:6]])
    dst = (jnp.full(shape, 3.0, jnp.bfloat16), jnp.full(shape, 3.0, jnp.bfloat16))
    dst_pages = jnp.array([2, 4, 6, 8, 10, 1, 12, 12], jnp.int32)
    # entry 2 into K position 0, entry 1 into V position 2, entry 0 into V position 1
    out = scatter_pages_kernel(dst, dst_pages, (packed,), jnp.array([0, 2, 1]),
                               sources=((0, 2, 0), (0, 1, 1), (0, 0, 1)), interpret=True)
    assert jnp.array_equal(out[0][0][:, :, dst_pages[:6]], k[1][:, :, pages[:6]])
    assert jnp.array_equal(out[1][2][:, :, dst_pages[:6]], v[0][:, :, pages[:6]])
    assert jnp.array_equal(out[1][1][:, :, dst_pages[:6]], k[2][:, :, pages[:6]])
    assert jnp.all(jnp.delete(out[0][0], dst_pages[:6], axis=2) == 3.0)  # other pages untouched, padding dropped
    assert jnp.all(out[0][1:] == 3.0) and jnp.all(out[1][0] == 3.0)  # positions not written stay as they were


# The fused decode kernel (RoPE + KV write + attention for one new token a row).

def _decode_case(seed, *, batch, tp, kv_heads, group, page_size, pages_per_seq, lengths, dtype):
    """A fused projection [B, 1, tp, R, X, H] and caches [R, L, tp x K, P, S, H], as a lane's step has them."""
    rng = np.random.default_rng(seed)
    q_heads = kv_heads * group
    X = q_heads + 2 * kv_heads
    cache_shape = (POSITIONS, LAYERS, tp * kv_heads, NUM_PAGES, page_size, HEAD_DIM)
    k_cache = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    v_cache = jnp.asarray(rng.standard_normal(cache_shape), dtype)
    qkv = jnp.asarray(rng.standard_normal((batch, 1, tp, POSITIONS, X, HEAD_DIM)), dtype)
    positions = jnp.asarray(np.asarray(lengths)[:, None], jnp.int32)
    page_table = jnp.asarray(np.stack([rng.permutation(NUM_PAGES)[:pages_per_seq] for _ in range(batch)]),
                             jnp.int32)
    return qkv, k_cache, v_cache, positions, page_table, q_heads


def _unfused_decode(qkv, k_cache, v_cache, layer, positions, valid, page_table, q_heads, inv_freq):
    """What the model runs without the fused kernel: RoPE, `write_kv_pages`, the reference attention."""
    from nitsum_jax.attention import write_kv_pages
    from nitsum_jax.model import apply_rope

    B, T, tp, R, X, H = qkv.shape
    kv_heads = (X - q_heads) // 2

    def by_position(a):
        return a.transpose(0, 1, 3, 2, 4, 5).reshape(B, T, R, -1, H)

    q = apply_rope(by_position(qkv[..., :q_heads, :]), positions, inv_freq)
    k = apply_rope(by_position(qkv[..., q_heads:q_heads + kv_heads, :]), positions, inv_freq)
    v = by_position(qkv[..., q_heads + kv_heads:, :])
    k_cache, v_cache = write_kv_pages(k_cache, v_cache, layer, k, v, positions, valid, page_table)
    f32 = [x.astype(jnp.float32) for x in (q, k_cache, v_cache)]
    attn = paged_attention_reference(*f32, layer, positions, page_table).astype(qkv.dtype)
    attn = attn.reshape(B, T, R, tp, q_heads, H).transpose(0, 1, 3, 2, 4, 5)
    return attn, k_cache, v_cache


def _inv_freq():
    return (1.0 / (10000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))).astype(np.float32)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "row_scale"])
def test_fused_decode_kernel_equals_rope_write_and_reference_attention(num_splits, dtype, tol, scaled):
    """RoPE, the KV write and attention in one kernel give the unfused path's output and caches:
    the new K/V in their slots, every other cache entry untouched, nothing written for an idle row.
    With a row scale (the norm weights folded into the projection) the rows are scaled first."""
    from nitsum_jax.kernels.decode_attention import decode_attention_kernel, rope_rows

    qkv, k_cache, v_cache, positions, page_table, q_heads = _decode_case(
        23, batch=4, tp=1, kv_heads=2, group=4, page_size=4, pages_per_seq=8, lengths=[0, 9, 30, 13], dtype=dtype)
    valid = jnp.array([[True], [True], [True], [False]])  # the last row is an idle slot
    layer = jnp.int32(1)
    row_scale = jnp.array([0.5, 1.7, 0.02, 3.0], jnp.float32) if scaled else None
    scaled_qkv = qkv if row_scale is None else (qkv * row_scale[:, None, None, None, None, None]).astype(dtype)
    want, want_k, want_v = _unfused_decode(scaled_qkv, k_cache, v_cache, layer, positions, valid, page_table,
                                           q_heads, _inv_freq())
    B, _, _, R, X, H = qkv.shape
    out, k_new, v_new = decode_attention_kernel(
        qkv.reshape(B, 1, R, X, H), rope_rows(positions[:, 0], _inv_freq(), H), k_cache, v_cache, layer,
        positions[:, 0], valid[:, 0], page_table, q_heads=q_heads, row_scale=row_scale, block_n=16,
        num_splits=num_splits, interpret=True)
    assert out.shape == (B, 1, R, q_heads, H) and out.dtype == qkv.dtype
    assert rel_err(out[:3], want[:3, 0]) < tol  # the idle row's output is not used
    written = np.asarray(k_new != k_cache) | np.asarray(v_new != v_cache)
    for new, ref, old in ((k_new, want_k, k_cache), (v_new, want_v, v_cache)):
        np.testing.assert_allclose(np.asarray(new, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
        changed = np.asarray(ref != old)
        assert not (np.asarray(new != old) & ~changed).any()  # nothing beyond the new tokens' slots
    # exactly the 3 valid rows' slots (R positions x kv heads x H) changed, in layer 1 only
    assert written[:, 1].any() and not written[:, 0].any()
    slots = written.any(axis=-1).sum()
    assert slots == 3 * R * 2, slots


def test_fused_decode_runs_per_kv_head_shard_inside_a_tp_step():
    """Under jit on a 2-device mesh with the tp axis sharded (as a TP2 lane runs its decode step in
    a layer loop), the fused kernel runs on each device's own heads: output and caches equal the
    unfused path, both stay sharded, and nothing is all-gathered."""
    from nitsum_jax.kernels.decode_attention import rope_rows
    from nitsum_jax.kernels.dispatch import decode_attention

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    qkv, k_cache, v_cache, positions, page_table, q_heads = _decode_case(
        29, batch=2, tp=2, kv_heads=1, group=2, page_size=4, pages_per_seq=4, lengths=[3, 12], dtype=jnp.float32)
    valid = jnp.ones((2, 1), bool)
    row_scale = jnp.array([0.7, 1.9], jnp.float32)

    def step(fused):
        def f(qkv, k_cache, v_cache, positions, page_table):
            def layer(i, carry):
                k_cache, v_cache, acc = carry
                if fused:  # the rows scaled in the kernel (folded norms), as a TP lane's step runs it
                    out, k_cache, v_cache = decode_attention(
                        qkv * (i + 1), rope_rows(positions[:, 0], _inv_freq(), HEAD_DIM), k_cache, v_cache, i,
                        positions, valid, page_table, q_heads=q_heads, row_scale=row_scale, interpret=True)
                else:
                    out, k_cache, v_cache = _unfused_decode(qkv * (i + 1) * row_scale[:, None, None, None, None, None],
                                                            k_cache, v_cache, i, positions, valid, page_table,
                                                            q_heads, _inv_freq())
                return k_cache, v_cache, acc + out
            return jax.lax.fori_loop(0, LAYERS, layer, (k_cache, v_cache, jnp.zeros((2, 1, 2, POSITIONS, q_heads,
                                                                                     HEAD_DIM))))
        return jax.jit(f)

    sharded = lambda *s: NamedSharding(mesh, PartitionSpec(*s))  # noqa: E731
    args = (jax.device_put(qkv, sharded(None, None, "tp")), jax.device_put(k_cache, sharded(None, None, "tp")),
            jax.device_put(v_cache, sharded(None, None, "tp")), jax.device_put(positions, sharded()),
            jax.device_put(page_table, sharded()))
    k_out, v_out, out = step(True)(*args)
    k_ref, v_ref, ref = step(False)(*args)
    assert rel_err(out, ref) < 1e-5
    np.testing.assert_allclose(np.asarray(k_out), np.asarray(k_ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v_out), np.asarray(v_ref), rtol=1e-6, atol=1e-6)
    assert k_out.sharding.spec[2] == "tp" and out.sharding.spec[2] == "tp"
    assert "all-gather" not in step(True).lower(*args).compile().as_text()


@pytest.mark.parametrize("folded", [False, True], ids=["", "norms_folded"])
def test_model_decode_steps_on_the_fused_kernel_equal_the_reference(tiny_cfg, tiny_params, folded):
    """The tiny model's decode steps through `forward` with the kernel (the fused decode kernel, in
    interpret mode) give the reference's hidden states and caches, an idle row included; also
    from the placed form, whose norm weights are folded into the projections (random norms here)."""
    from nitsum_jax.kv import allocate_kv_cache
    from nitsum_jax.model import StepInput, forward, place

    if folded:
        keys = jax.random.split(jax.random.key(5), 2)
        tiny_params = tiny_params.replace(
            attn_norm=1 + 0.3 * jax.random.normal(keys[0], tiny_params.attn_norm.shape, tiny_params.attn_norm.dtype),
            mlp_norm=1 + 0.3 * jax.random.normal(keys[1], tiny_params.mlp_norm.shape, tiny_params.mlp_norm.dtype))
    fused_params = place(tiny_params) if folded else tiny_params
    assert fused_params.groups[0].norms_folded if folded else not fused_params.groups

    rng = np.random.default_rng(3)
    table = np.stack([rng.permutation(16)[:4] for _ in range(2)]).astype(np.int32)
    prompt = StepInput(tokens=rng.integers(0, tiny_cfg.vocab_size, (2, 6), dtype=np.int32),
                       start_pos=np.zeros(2, np.int32), num_new=np.array([6, 4], np.int32), page_table=table)
    run = jax.jit(lambda p, kv, s, attention: forward(p, kv, s, tiny_cfg, attention=attention),
                  static_argnames="attention")
    _, kv = run(tiny_params, allocate_kv_cache(tiny_cfg, 16, 4), prompt, "reference")
    kv_ref = kv_fused = kv
    for t in range(3):
        step = StepInput(tokens=rng.integers(0, tiny_cfg.vocab_size, (2, 1), dtype=np.int32),
                         start_pos=np.array([6 + t, 4], np.int32), num_new=np.array([1, t % 2], np.int32),
                         page_table=table)
        h_ref, kv_ref = run(tiny_params, kv_ref, step, "reference")
        h_fused, kv_fused = run(fused_params, kv_fused, step, "interpret")
        assert rel_err(h_fused[0], h_ref[0]) < 1e-2
        if t % 2:
            assert rel_err(h_fused[1], h_ref[1]) < 1e-2
        for a, b in ((kv_fused.k, kv_ref.k), (kv_fused.v, kv_ref.v)):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("pages_per_seq", [64, 256])  # tables of 1024 and 4096 tokens
def test_kernels_lower_to_triton_for_the_gpu(num_splits, dtype, pages_per_seq):
    """Interpret mode runs the kernels as plain JAX; lowering them for CUDA (which works without
    a GPU) runs Pallas's Triton lowering, whose rules are stricter (masks, scalar selects)."""
    from nitsum_jax.kernels.decode_attention import decode_attention_kernel

    B, K, G, H, S, P, L = 8, 8, 4, 128, 16, 2048, 2
    sds = jax.ShapeDtypeStruct
    cache = sds((1, L, K, P, S, H), dtype)
    ints = lambda *shape: sds(shape, jnp.int32)  # noqa: E731
    lowered = [
        jax.jit(functools.partial(decode_attention_kernel, q_heads=K * G, num_splits=num_splits)).trace(
            sds((B, 1, 1, K * (G + 2), H), dtype), sds((B, 2, H), jnp.float32), cache, cache, ints(), ints(B),
            sds((B,), jnp.bool_), ints(B, pages_per_seq)),
        jax.jit(functools.partial(decode_attention_kernel, q_heads=K * G, num_splits=num_splits)).trace(
            sds((B, 1, 1, K * (G + 2), H), dtype), sds((B, 2, H), jnp.float32), cache, cache, ints(), ints(B),
            sds((B,), jnp.bool_), ints(B, pages_per_seq), row_scale=sds((B,), jnp.float32)),
        jax.jit(functools.partial(paged_attention_kernel, num_splits=num_splits)).trace(
            sds((B, 1, 1, K * G, H), dtype), cache, cache, ints(), ints(B, 1), ints(B, pages_per_seq)),
    ]
    texts = [traced.lower(lowering_platforms=("cuda",)).as_text() for traced in lowered]
    assert all("xla.gpu.triton" in text for text in texts)
    assert "decode_attention_m16_n64_" in texts[0]


def test_wide_decode_steps_with_gate_up_written_rows_last_equal_the_plain_form(tiny_cfg, tiny_params, monkeypatch):
    """From `model.ROWS_LAST_DECODE_ROWS` rows a decode step computes gate/up with the gemm's
    output transposed (for cuBLAS's kernel choice); the hidden states are those of the plain form."""
    from nitsum_jax import model
    from nitsum_jax.kv import allocate_kv_cache
    from nitsum_jax.model import StepInput, forward, place

    B = model.ROWS_LAST_DECODE_ROWS
    specs = []
    real_matmul = model.matmul
    monkeypatch.setattr(model, "matmul", lambda spec, x, w: specs.append(spec) or real_matmul(spec, x, w))
    rng = np.random.default_rng(11)
    step = StepInput(tokens=rng.integers(0, tiny_cfg.vocab_size, (B, 1), dtype=np.int32),
                     start_pos=np.zeros(B, np.int32), num_new=np.ones(B, np.int32),
                     page_table=np.arange(B, dtype=np.int32)[:, None])
    placed = place(tiny_params)
    kv = allocate_kv_cache(tiny_cfg, B, 4)
    rows_last, _ = jax.jit(lambda p, kv, s: forward(p, kv, s, tiny_cfg, attention="reference"))(placed, kv, step)
    assert "BTD,CRDGF->CRGFBT" in specs  # the transposed gemm ran
    specs.clear()
    monkeypatch.setattr(model, "ROWS_LAST_DECODE_ROWS", B + 1)
    plain, _ = jax.jit(lambda p, kv, s: forward(p, kv, s, tiny_cfg, attention="reference"))(placed, kv, step)
    assert "BTD,CRDGF->BTCRGF" in specs and "BTD,CRDGF->CRGFBT" not in specs
    assert rel_err(rows_last, plain) < 1e-5
