"""`nitsum-ckpt convert-hf --dtype fp8`: fp8 values and scales stored, restored as an fp8 model,
close to the bf16 conversion of the same Hugging Face model; `generate --weights` on top."""

import json

import jax
import numpy as np
import pytest

from checkpoints_tools import cli as ckpt_cli
from checkpoints_tools.store import CheckpointError, checkpoint_format, describe, load_params, read_config
from hf_models import make_hf_llama
from nitsum_jax import cli
from nitsum_jax.kv import allocate_kv_cache
from nitsum_jax.model import StepInput, param_specs
from nitsum_jax.quant import CONTRACTED, Fp8Weight, quantize_params
from nitsum_jax.sampling import SamplingParams
from nitsum_jax.generate import Generator
from nitsum_jax.steps import step_logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8ckpt")
    make_hf_llama(root / "hf", tie=False, seed=11)
    for dtype in ("bf16", "fp8"):
        assert ckpt_cli.main(["convert-hf", str(root / "hf"), str(root / dtype), "--quiet", "--dtype", dtype]) == 0
    return root


def test_fp8_checkpoint_stores_fp8_values_and_float32_scales(converted):
    info = describe(converted / "fp8")
    assert info["weights"] == "fp8" and checkpoint_format(converted / "bf16") == "bf16"
    assert info["config"]["dtype"] == "bfloat16"  # activations, embeddings, norms and LM head
    arrays = info["arrays"]
    for name in CONTRACTED:
        assert arrays[f"chunks.0.{name}.q"]["dtype"] == "float8_e4m3fn"
        assert arrays[f"chunks.0.{name}.scale"]["dtype"] == "float32"
    assert arrays["chunks.0.embed"]["dtype"] == arrays["chunks.0.lm_head"]["dtype"] == "bfloat16"
    assert info["bytes"] < 0.75 * describe(converted / "bf16")["bytes"]


def test_fp8_checkpoint_restores_the_quantized_bf16_conversion_exactly(converted):
    cfg = read_config(converted / "fp8")
    assert cfg == read_config(converted / "bf16")
    fp8 = load_params(converted / "fp8", cfg)
    assert isinstance(fp8.chunks[0].w_down, Fp8Weight)
    want = quantize_params(load_params(converted / "bf16", cfg))
    for a, b in zip(jax.tree.leaves(fp8), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_fp8_checkpoint_refuses_shardings_of_bf16_weights(converted):
    cfg = read_config(converted / "fp8")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, param_specs(cfg))
    with pytest.raises(CheckpointError, match="stores fp8 weights but the shardings given are for bf16"):
        load_params(converted / "fp8", cfg, shardings)


def all_logits(cfg, params, ids) -> np.ndarray:
    kv = allocate_kv_cache(cfg, 32, 4)
    step = StepInput(tokens=np.asarray(ids, np.int32)[None], start_pos=np.array([0], np.int32),
                     num_new=np.array([len(ids)], np.int32), page_table=np.arange(32, dtype=np.int32)[None])
    return np.asarray(step_logits(params, kv, step, cfg)[0][0], np.float64)


def test_teacher_forced_nll_of_fp8_is_within_one_percent_of_bf16(converted):
    """On the bf16 model's own greedy continuation, where its NLL is lowest and a quantization
    error shows most, and on random text."""
    cfg = read_config(converted / "bf16")
    dense, fp8 = load_params(converted / "bf16", cfg), load_params(converted / "fp8", cfg)
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, 256, size=12)]
    [out] = Generator(cfg, dense, page_size=4, max_batch=1, max_seq_len=128).generate(
        [prompt], SamplingParams(max_tokens=48, ignore_eos=True))
    for ids in (np.array(prompt + out.token_ids), np.random.default_rng(6).integers(0, 256, size=60)):
        def nll(logits):
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            return -logp[np.arange(len(ids) - 1), ids[1:]].mean()

        want, got = nll(all_logits(cfg, dense, ids)), nll(all_logits(cfg, fp8, ids))
        assert want != got and abs(got - want) <= 0.01 * want, (got, want)


def test_generate_runs_an_fp8_checkpoint_as_stored_or_upcast(converted, capsys):
    outs = {}
    for weights in ("auto", "bf16", "fp8"):
        assert cli.main(["generate", "--checkpoint", str(converted / "fp8"), "--token-ids", "256,65,66",
                         "--max-tokens", "4", "--ignore-eos", "--json", "--weights", weights]) == 0
        outs[weights] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    assert len(outs["auto"]) == 4
    assert outs["auto"] == outs["fp8"]  # the fp8 checkpoint is an fp8 model as stored
