"""`nitsum-jax bench` end to end on 8 host devices: a short static-vs-adaptive run on the tiny
model, checked for its files, its results.json schema and its request accounting (no timing)."""

import json
import subprocess
import sys

import pytest

from nitsum_jax.bench import load_trace, poisson_workload, run_bench, to_frames
from nitsum_jax.plans import BucketGrid

PLANS = "static: all=tp8@0-7; mixed: high=tp4@0-3, low=tp4@4-7"  # few lanes: a short compile
GRID = BucketGrid(decode_batch=(4,), prefill_len=(16,), max_seq_len=64, min_move_pages=8)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = run_bench(configs=("static", "adaptive"), rates=(20.0,), num_requests=14, prompt_len="4-16",
                        output_len="4-12", seed=3, plans=PLANS, num_devices=8, grid=GRID, num_pages=32,
                        page_size=8, out_dir=out, progress=False, sampled_fraction=0.5)
    return out, results


def test_bench_writes_results_report_requests_and_plots(bench):
    out, results = bench
    for name in ("results.json", "report.md", "requests.jsonl", "latency_cdf.png",
                 "throughput_goodput_vs_rate.png", "plan_timeline.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| static | high |" in (out / "report.md").read_text()


def test_results_json_has_the_documented_schema(bench):
    out, _ = bench
    results = json.loads((out / "results.json").read_text())
    for name in ("static", "adaptive"):
        config = results["configs"][name]
        for key in ("throughput_rps", "output_tokens_per_s", "goodput_rps", "device_busy_fraction"):
            assert isinstance(config[key], float), (name, key)
        for cls, figures in config["classes"].items():
            assert cls in ("high", "low")
            for key in ("ttft_p99_s", "tpot_p99_s", "e2e_p99_s", "goodput_rps"):
                assert key in figures, (name, cls, key)
    assert set(results["ratios"]["adaptive/static"]) >= {"throughput_rps", "goodput_rps", "classes"}
    assert results["workload"]["seed"] == 3 and results["workload"]["num_requests"] == 14
    assert results["machine"]["device_count"] == 8 and results["git"]["commit"]
    assert results["date"] and results["slo"]["high"]["ttft_target_s"] > 0


def test_both_configurations_saw_the_same_requests(bench):
    _, results = bench
    ids = [results["configs"][name]["request_ids"] for name in ("static", "adaptive")]
    assert ids[0] == ids[1] and len(ids[0]) == 14 and len(set(ids[0])) == 14
    assert results["request_ids"]["same_across_configs"]
    frames = to_frames(results)["requests"]
    by_config = frames.groupby("config")[["request_id", "priority_class", "prompt_tokens", "max_tokens"]]
    static, adaptive = (g.reset_index(drop=True) for _, g in by_config)
    assert static.equals(adaptive)


def test_counts_add_up_and_completed_requests_got_all_their_tokens(bench):
    _, results = bench
    for name, counts in results["counts"].items():
        assert counts["completed"] + counts["rejected"] + counts["failed"] == counts["sent"] == 14, name
        classes = results["configs"][name]["classes"].values()
        assert sum(c["sent"] for c in classes) == 14
    for record in results["requests"]:
        if record["status"] == "completed":
            assert record["output_tokens"] == record["max_tokens"]  # EOS ignored: same work in every config
            assert record["sent_s"] <= record["first_token_s"] <= record["finish_s"]


def test_the_same_seed_gives_the_same_workload_and_a_trace_round_trips(tmp_path):
    a = poisson_workload(5.0, duration_s=4.0, seed=9, prompt_len="lognormal:20:0.5", output_len="8-16",
                         sampled_fraction=0.5, temperature=0.7)
    b = poisson_workload(5.0, duration_s=4.0, seed=9, prompt_len="lognormal:20:0.5", output_len="8-16",
                         sampled_fraction=0.5, temperature=0.7)
    assert a.requests == b.requests and len(a.requests) > 5
    assert all(1 <= r.prompt_len <= 80 and 8 <= r.output_len <= 16 for r in a.requests)
    assert {r.temperature for r in a.requests} == {0.0, 0.7}
    assert a.params["sampled_requests"] == sum(r.temperature > 0 for r in a.requests)
    # the sampled share changes only temperatures and seeds: the greedy workload is the same requests
    greedy = poisson_workload(5.0, duration_s=4.0, seed=9, prompt_len="lognormal:20:0.5", output_len="8-16")
    assert [r.temperature for r in greedy.requests] == [0.0] * len(a.requests)
    assert [(r.arrival_s, r.prompt_ids, r.output_len) for r in greedy.requests] == \
           [(r.arrival_s, r.prompt_ids, r.output_len) for r in a.requests]
    a.to_jsonl(tmp_path / "trace.jsonl")
    replay = load_trace(tmp_path / "trace.jsonl")
    fields = lambda r: (r.arrival_s, r.priority_class, r.prompt_len, r.output_len, r.temperature, r.seed)  # noqa: E731
    assert [fields(r) for r in replay.requests] == [fields(r) for r in a.requests]
    with pytest.raises(ValueError, match="sampled_fraction"):
        poisson_workload(5.0, sampled_fraction=1.5)


def test_sampled_requests_ran_the_sampler_in_both_configurations(bench):
    _, results = bench
    assert results["workload"]["sampled_fraction"] == 0.5 and results["workload"]["sampled_requests"] > 0
    for name in ("static", "adaptive"):
        assert sum(results["configs"][name]["sampler_runs"].values()) > 0, name


def test_adaptive_run_ends_with_a_switch_cost_probe_in_results_and_report(bench):
    out, results = bench
    assert "switch_probe" not in results["configs"]["static"]  # one lane, one plan: nothing to switch
    probe = results["configs"]["adaptive"]["switch_probe"]
    assert set(probe["switch_ms"]) == {"static->mixed", "mixed->static"}
    moves = {(m["src"], m["dst"]): m for m in probe["moves"]}
    assert {("tp8@0-7", "tp4@0-3"), ("tp4@0-3", "tp8@0-7"), ("tp4@0-3", "tp4@4-7")} <= set(moves)
    assert all(m["contents_equal"] and m["GB_per_s"] > 0 and m["tokens"] == GRID.max_seq_len for m in moves.values())
    report = (out / "report.md").read_text()
    assert "## Switch costs" in report and "| adaptive | tp8@0-7 -> tp4@0-3 | 64 |" in report


def test_bench_command_is_registered_without_importing_jax():
    code = ("import sys; from nitsum_jax.cli import build_parser; "
            "args = build_parser().parse_args(['bench', '--rates', '4,8', '--configs', 'adaptive']); "
            "assert args.rates == [4.0, 8.0] and args.configs == ['adaptive']; assert 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_static_plan_option_builds_static_from_its_own_plan():
    from nitsum_jax.bench.backends import EngineBackend

    backend = EngineBackend.build("static", adaptive=False, plans="mixed: high=tp2@0-1, low=tp2@2-3",
                                  static_plan="static: all=tp4@0-3", num_devices=4, grid=GRID, num_pages=16,
                                  page_size=8)
    try:
        assert list(backend.engine.plan_set.plans) == ["static"]
        assert [lane.spec.tp for lane in backend.engine.plan_set.lanes.values()] == [4]
    finally:
        backend.close()


def test_switch_log_shows_kv_move_bandwidth_when_a_switch_moved_kv():
    from nitsum_jax.bench.report import _move_rate

    assert _move_rate({"moved_bytes": 537_000_000, "move_s": 0.002}) == " (537.0 MB in 2.00 ms, 268.5 GB/s)"
    assert _move_rate({"moved_bytes": 0, "move_s": 0.0}) == ""
    assert _move_rate({}) == ""  # results written before the fields existed


def test_a_profile_window_traces_part_of_a_run_and_is_summarised(tmp_path, monkeypatch):
    """NITSUM_BENCH_PROFILE=DIR:START:SECONDS writes a jax.profiler trace of that window of each
    run; bench/trace_summary.py reads it (on host devices: the host threads only)."""
    sys.path.insert(0, "bench")
    try:
        from trace_summary import summarize
    finally:
        sys.path.remove("bench")
    monkeypatch.setenv("NITSUM_BENCH_PROFILE", f"{tmp_path}/trace:0:0.5")
    # The same run checks that a switch-cost probe that fails (say, out of device memory) is
    # reported and does not cost the run its results.
    from nitsum_jax.bench.backends import EngineBackend

    def no_memory(self, repeats=3):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    monkeypatch.setattr(EngineBackend, "switch_costs", no_memory)
    results = run_bench(configs=("adaptive",), rates=(20.0,), num_requests=6, prompt_len="4-8", output_len="8",
                        seed=1, plans=PLANS, num_devices=8, grid=GRID, num_pages=32, page_size=8,
                        out_dir=tmp_path / "out", progress=False)
    assert results["configs"]["adaptive"]["switch_probe"] == {"error": "RuntimeError: RESOURCE_EXHAUSTED: out of memory"}
    assert results["counts"]["adaptive"]["completed"] == 6
    assert "adaptive: switch-cost probe failed: RuntimeError" in (tmp_path / "out" / "report.md").read_text()
    traces = list((tmp_path / "trace" / "adaptive-1").rglob("*.xplane.pb"))
    assert len(traces) == 1
    summary = summarize(str(traces[0]))
    assert summary["gpus"] == {} and summary["window_ms"] > 0
    assert any(events for events in summary["host_threads"].values())
