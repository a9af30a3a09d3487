"""Numerical parity with Hugging Face transformers (PyTorch CPU, fp32) through the paged cache."""

import numpy as np
import pytest
import torch

from checkpoints_tools import cli as ckpt_cli
from checkpoints_tools.store import load_params, read_config
from hf_models import make_hf_llama
from nitsum_jax.generate import Generator
from nitsum_jax.kv import PageAllocator, allocate_kv_cache
from nitsum_jax.model import StepInput, place
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.steps import step_logits

PAGE_SIZE = 4  # small pages so every sequence spans many of them
TOLERANCE = 1e-4  # max abs error relative to the largest |logit|


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tied" if request.param else "untied")
    hf_model = make_hf_llama(root / "hf", tie=request.param, seed=7)
    assert ckpt_cli.main(["convert-hf", str(root / "hf"), str(root / "ours"), "--quiet"]) == 0
    cfg = read_config(root / "ours")
    assert cfg.tie_embeddings == request.param and cfg.rope_scaling is not None
    assert cfg.num_kv_heads < cfg.num_heads
    return hf_model, cfg, load_params(root / "ours", cfg)


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].numpy()


def scattered_allocator(num_pages=64):
    """An allocator whose next pages are not contiguous, so page-table indexing is exercised."""
    alloc = PageAllocator(num_pages, PAGE_SIZE)
    for i in range(6):
        alloc.reserve(("filler", i), PAGE_SIZE)
    for i in range(0, 6, 2):
        alloc.free(("filler", i))
    return alloc


def run_paged(cfg, params, ids, chunks):
    """Feed `ids` through the paged cache in chunks of the given sizes; logits of every position."""
    alloc = scattered_allocator()
    alloc.reserve("seq", len(ids))
    pages = alloc.page_table(["seq"], 16)
    kv = allocate_kv_cache(cfg, alloc.num_pages, PAGE_SIZE)
    out, pos = [], 0
    for n in chunks:
        tokens = np.zeros((1, max(n, 1)), np.int32)
        tokens[0, :n] = ids[pos:pos + n]
        step = StepInput(tokens=tokens, start_pos=np.array([pos], np.int32), num_new=np.array([n], np.int32),
                         page_table=pages)
        logits, kv = step_logits(params, kv, step, cfg)
        out.append(np.asarray(logits[0, :n]))
        pos += n
    return np.concatenate(out)


def assert_close(ours, ref):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= TOLERANCE, f"max abs error {err:.2e} of logit scale exceeds {TOLERANCE}"


def test_prefill_logits_match_transformers(converted):
    hf_model, cfg, params = converted
    ids = np.random.default_rng(0).integers(0, 256, size=37)
    assert_close(run_paged(cfg, params, ids, [37]), hf_logits(hf_model, ids))


def test_every_decode_step_logits_match_transformers(converted):
    hf_model, cfg, params = converted
    prompt = list(np.random.default_rng(1).integers(0, 256, size=11))
    continuation = list(np.random.default_rng(2).integers(0, cfg.vocab_size, size=32))
    ids = np.array(prompt + continuation)
    # Prefill the prompt, then one token per step: 32 decode steps through the pages.
    ours = run_paged(cfg, params, ids, [len(prompt)] + [1] * len(continuation))
    assert_close(ours, hf_logits(hf_model, ids))


def test_chunked_prefill_matches_one_shot_prefill(converted):
    hf_model, cfg, params = converted
    ids = np.random.default_rng(3).integers(0, 256, size=30)
    assert_close(run_paged(cfg, params, ids, [7, 9, 1, 13]), hf_logits(hf_model, ids))


def test_placed_weights_with_the_norms_folded_in_match_transformers(converted):
    """A lane's placed form carries each layer's norm weights inside wqkv and w_gate_up and
    scales the gemm outputs by 1 / rms (`model.fold_norms`): the same logits, prefill and decode."""
    hf_model, cfg, params = converted
    placed = place(params)
    assert placed.groups[0].norms_folded
    ids = np.random.default_rng(6).integers(0, 256, size=24)
    assert_close(run_paged(cfg, placed, ids, [13] + [1] * 11), hf_logits(hf_model, ids))


def test_32_greedy_tokens_identical_to_transformers(converted):
    hf_model, cfg, params = converted
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, 256, size=9)]
    ids = list(prompt)
    for _ in range(32):
        ids.append(int(hf_logits(hf_model, ids)[-1].argmax()))
    generator = Generator(cfg, params, page_size=PAGE_SIZE, max_batch=1, max_seq_len=128)
    [out] = generator.generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True))
    assert out.token_ids == ids[len(prompt):]
    assert generator.allocator.num_used == 0


def test_teacher_forced_nll_matches_transformers(converted):
    hf_model, cfg, params = converted
    ids = np.random.default_rng(5).integers(0, 256, size=48)

    def nll(logits):
        logits = logits.astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        return -logp[np.arange(len(ids) - 1), ids[1:]].mean()

    ours = nll(run_paged(cfg, params, ids, [16, 1, 1, 1, 29]))
    ref = nll(hf_logits(hf_model, ids))
    assert abs(ours - ref) <= 1e-5 * abs(ref), (ours, ref)
