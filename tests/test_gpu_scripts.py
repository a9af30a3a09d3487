"""The GPU measurement scripts that BENCHMARKS.md cites still run, end to end, on host devices
with tiny sizes (their numbers mean nothing here; their checks of moved or compared contents do)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def run_script(args: list[str], devices: int, tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    return json.loads(result.read_text())


def test_gpu_transfer_moves_equal_contents_every_way(tmp_path):
    out = run_script(["bench/gpu_transfer.py", "--mb", "2", "--repeats", "2", "--pieces", "1,2"], 2, tmp_path)
    runs = out["runs"]
    ways = ("device_put", "nccl", "memcpy", "nccl32")
    assert set(runs) == {f"{w} x{p}" for w in ways + ("cuda",) for p in (1, 2)}
    assert all(runs[f"{w} x{p}"].get("equal") is True for w in ways for p in (1, 2)), runs
    # raw CUDA peer copies need a GPU: reported, not fatal
    assert all("CUDA" in runs[f"cuda x{p}"]["error"] for p in (1, 2)), runs


def test_gpu_step_times_and_compares_impls_on_the_same_inputs(tmp_path):
    out = run_script(["bench/gpu_step.py", "--preset", "tiny", "--tps", "1,2", "--batches", "4",
                      "--impls", "kernel,oneshot", "--context", "32", "--max-seq-len", "64", "--repeats", "2",
                      "--profile", "2:4", "--chunks", "1,2"], 2, tmp_path)
    chunked = [r for r in out["rows"] if r["impl"] == "chunked"]
    # a TP1 lane of a two-chunk set, built on one device: its weights in two slots, both read
    assert [(r["tp"], r["chunks"], r["batch"]) for r in chunked] == [(1, 2, 4)] and chunked[0]["step_ms"] > 0
    assert chunked[0]["weight_GB_per_device"] == pytest.approx(
        next(r for r in out["rows"] if r["tp"] == 1)["weight_GB_per_device"])
    rows = {(r["impl"], r["tp"]): r for r in out["rows"] if r["impl"] != "chunked"}
    assert set(rows) == {(i, t) for i in ("kernel", "oneshot") for t in (1, 2)}
    for tp in (1, 2):
        assert rows[("oneshot", tp)]["vs_kernel"]["same_tokens"] == 1.0
        assert rows[("kernel", tp)]["step_ms"] > 0
    # the MBU denominator: the best copy that ran (the driver copy needs a GPU: reported, not fatal),
    # on a small buffer on host devices; contents checked after each copy
    copies = out["copy_bandwidth"]
    assert copies["buffer_GiB"] < 1 and copies["spec_GBps"] is None
    assert "CUDA" in copies["ways"]["driver"]["error"]
    assert copies["best"] in ("jit_copy", "jit_scale") and all(
        copies["ways"][w]["equal"] is True for w in ("jit_copy", "jit_scale"))
    assert out["hbm_GBps"] == copies["GBps"] == max(copies["ways"][w]["GBps"] for w in ("jit_copy", "jit_scale"))
    assert rows[("kernel", 1)]["mbu_spec"] is None
    assert set(out["profiles"]) == set(out["timelines"]) == {"kernel_tp2_c1_b4", "oneshot_tp2_c1_b4"}


def test_gpu_step_timeline_counts_overlapping_kernels_once_and_names_the_gaps():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_step
    finally:
        sys.path.remove(str(ROOT / "bench"))
    us = 1000  # ns
    events = [(30 * us, 50 * us, "c"), (0, 10 * us, "a"), (12 * us, 40 * us, "b"), (100 * us, 110 * us, "d")]
    tl = gpu_step.timeline(events, steps=2)
    # kernels 0-10, 12-50 (b and c overlap), 100-110 us: busy 58 of a 110 us window, two steps
    assert (tl["window_ms"], tl["busy_ms"], tl["idle_ms"]) == (0.055, 0.029, 0.026)
    assert (tl["gaps"], tl["gaps_over_10us"]) == (2, 1)
    assert tl["longest"] == [{"us": 50.0, "after": "c", "before": "d"}, {"us": 2.0, "after": "a", "before": "b"}]
    assert gpu_step.timeline([], steps=1) == {}


def test_copy_bandwidth_refuses_an_empty_buffer():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import copy_bandwidth
        import jax

        with pytest.raises(ValueError, match="0 GiB"):
            copy_bandwidth.measure(jax.devices()[0], gib=0)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_gpu_moves_moves_every_kind_of_move_with_its_contents_intact(tmp_path):
    out = run_script(["bench/gpu_moves.py", "--preset", "tiny", "--move-tokens", "256", "--copies", "xla",
                      "--pieces", "1", "--transports", "packed", "--sync", "auto", "--repeats", "2"], 4, tmp_path)
    moves = out["moves"]
    assert sum(k.startswith("packed ") for k in moves) >= 7  # TP4<->TP2, TP2->TP2, TP1<->TP4, TP1<->TP2
    assert sum(k.startswith("xla ") for k in moves) >= 7
    assert all(m["contents_equal"] is True for m in moves.values()), moves
