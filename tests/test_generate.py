"""Batched generation over the paged cache: batching must not change any sequence's tokens."""

import numpy as np
import pytest

from nitsum_jax.generate import Generator
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.sequence import RequestError
from nitsum_jax.tokenizer import TextTokenizer


def prompts_of_different_lengths(seed=0):
    rng = np.random.default_rng(seed)
    return [[256] + [int(t) for t in rng.integers(0, 256, size=n)] for n in (3, 17, 8, 30, 1)]


def test_batched_greedy_decode_equals_each_sequence_alone(tiny_cfg, tiny_params):
    prompts = prompts_of_different_lengths()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    batched = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=8, max_seq_len=128).generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        [alone] = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=1, max_seq_len=128).generate([prompt], params)
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_a_bf16_model_decodes_batches_on_the_cpu(tiny_cfg):
    """A converted Hugging Face model is bf16: its batched steps must run on a CPU too (XLA's CPU
    runtime lacks some bf16 dots with float32 output; the attention reference computes in float32)."""
    import jax

    from nitsum_jax.model import init_params

    cfg = tiny_cfg.replace(dtype="bfloat16", num_kv_heads=2)  # GQA, as a converted Llama
    params = init_params(cfg, jax.random.key(0))
    prompts = prompts_of_different_lengths()[:3]
    outs = Generator(cfg, params, page_size=8, max_batch=4, max_seq_len=128).generate(
        prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [6, 6, 6]


def test_seeded_sampling_is_the_same_batched_or_alone(tiny_cfg, tiny_params):
    prompts = prompts_of_different_lengths(1)
    params = [SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=s, ignore_eos=True)
              for s in range(len(prompts))]
    batched = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=8, max_seq_len=128).generate(prompts, params)
    gen = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=1, max_seq_len=128)
    for prompt, p, out in zip(prompts, params, batched):
        assert gen.generate([prompt], p)[0].token_ids == out.token_ids
    assert len({tuple(o.token_ids) for o in batched}) == len(prompts)


def test_pages_are_all_free_after_generation(tiny_cfg, tiny_params):
    gen = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=4, max_seq_len=128)
    gen.generate(prompts_of_different_lengths(2), SamplingParams(max_tokens=5, ignore_eos=True))
    assert gen.allocator.num_used == 0 and gen.allocator.num_free == gen.allocator.num_pages


def test_more_requests_than_batch_slots_all_complete(tiny_cfg, tiny_params):
    prompts = prompts_of_different_lengths(3) * 3
    outs = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=2, max_seq_len=128).generate(
        prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [4] * len(prompts)
    assert outs[0].token_ids == outs[5].token_ids  # same prompt, greedy: same tokens


def test_text_prompt_with_stop_string_truncates(tiny_cfg, tiny_params):
    tok = TextTokenizer.byte_level()
    gen = Generator(tiny_cfg, tiny_params, tok, page_size=8, max_batch=1, max_seq_len=128)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    # Find a greedy output with a printable ASCII byte after its first token to use as the stop.
    for prompt in ["stop strings", "priority", "lanes", "tiny model", "hello"]:
        [free_run] = gen.generate([prompt], params)
        hits = [i for i, t in enumerate(free_run.token_ids) if i >= 1 and 32 <= t < 127]
        if hits:
            break
    assert hits, "no printable byte in five greedy outputs of the tiny model"
    at = hits[0]
    stop = chr(free_run.token_ids[at])
    [stopped] = gen.generate([prompt], SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))
    assert stopped.finish_reason == "stop"
    expected = tok.decode(free_run.token_ids[:at + 1])
    assert stopped.text == expected[:expected.find(stop)]
    assert stopped.token_ids == free_run.token_ids[:len(stopped.token_ids)]
    assert len(stopped.token_ids) <= at + 1


def test_prompt_over_context_is_refused_with_the_limit(tiny_cfg, tiny_params):
    gen = Generator(tiny_cfg, tiny_params, page_size=8, max_batch=1, max_seq_len=64)
    with pytest.raises(RequestError, match="exceeds the context limit 64"):
        gen.generate([[1] * 60], SamplingParams(max_tokens=10))
    assert gen.allocator.num_used == 0
