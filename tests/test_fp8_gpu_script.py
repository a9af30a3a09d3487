"""bench/gpu_fp8.py runs end to end on a host device with the tiny preset (its times mean nothing
here; its byte counts and its fp8-against-bf16 comparisons do)."""

from test_gpu_scripts import run_script


def test_gpu_fp8_times_both_formats_and_compares_their_tokens(tmp_path):
    out = run_script(["bench/gpu_fp8.py", "--preset", "tiny", "--batches", "1,2", "--context", "32",
                      "--max-seq-len", "64", "--repeats", "2", "--profile", "2", "--agree-preset", "tiny",
                      "--agree-prompts", "2", "--agree-tokens", "8", "--copy-gib", "0.01"], 1, tmp_path)
    dense, fp8 = out["formats"]["bf16"], out["formats"]["fp8"]
    assert [r["batch"] for r in dense["rows"]] == [r["batch"] for r in fp8["rows"]] == [1, 2]
    assert set(out["speedup"]) == {"1", "2"} and all(s > 0 for s in out["speedup"].values())
    assert set(out["speedup_b2b"]) == {"1", "2"} and all(r["b2b_ms"] > 0 for r in dense["rows"] + fp8["rows"])
    # fewer weight bytes, the same KV bytes: the floor of an fp8 step is lower, by less than the weights' ratio
    assert all(1 < s < 1 / out["weight_bytes_ratio"] for s in out["speedup_at_floor"].values())
    # tiny is float32: its linear weights go from 4 bytes to 1 plus scales; the LM head stays
    assert 0.25 < out["weight_bytes_ratio"] < 0.6
    assert fp8["memory_report_weights_GB"] < dense["memory_report_weights_GB"]
    # the kernel profile of a b2 step of each (host devices trace no GPU kernels: the totals only)
    assert all(f["profile"][0]["kernel"].startswith("(all kernels") and "timeline" in f for f in (dense, fp8))
    agree = out["agreement"]
    assert agree["prompts"] == 2 and len(agree["per_prompt"]) == 2
    assert 0 <= agree["argmax_equal_teacher_forced"] <= 1 and agree["nll_bf16"] > 0
    assert abs(agree["nll_relative_diff"]) < 0.05


def test_gpu_fp8_times_a_lane_of_two_devices(tmp_path):
    out = run_script(["bench/gpu_fp8.py", "--preset", "tiny", "--tp", "2", "--batches", "2", "--context", "32",
                      "--max-seq-len", "64", "--repeats", "2", "--profile", "0", "--agree-preset", "tiny",
                      "--agree-prompts", "1", "--agree-tokens", "4", "--copy-gib", "0.01"], 2, tmp_path)
    assert out["tp"] == 2 and all(out["formats"][f]["rows"][0]["step_ms"] > 0 for f in ("bf16", "fp8"))


def test_fp8_quality_trains_converts_both_ways_and_compares_on_held_out_text(tmp_path):
    out = run_script(["bench/fp8_quality.py", "--steps", "3", "--batch", "2", "--seq", "64", "--dim", "64",
                      "--layers", "1", "--heads", "4", "--ffn", "128", "--prompts", "2", "--tokens", "16",
                      "--nll-len", "32", "--reference"], 1, tmp_path)
    assert out["training"]["steps"] == 3 and out["training"]["params"] > 0
    assert out["corpus"]["train_bytes"] > out["corpus"]["held_out_bytes"] > 0
    agree = out["agreement"]
    # the `nitsum-ckpt convert-hf` checkpoints as stored: bf16 activations, linear weights bf16 then fp8
    assert agree["formats"] == ["bfloat16", "bfloat16 + fp8 weights"]
    assert out["reference"]["formats"] == ["float32", "bfloat16"]
    assert agree["prompts"] == 2 and len(agree["per_prompt"]) == 2
    assert 0 <= agree["greedy_prefix_equal"] <= 1 and 0 <= agree["argmax_equal_teacher_forced"] <= 1
    assert agree["nll_text_base"] > 0 and abs(agree["nll_relative_diff"]) < 0.05
