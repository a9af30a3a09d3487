"""The simulator: the engine core on a virtual clock, step times from a profile; baselines; plan."""

import dataclasses
import json

import numpy as np
import pytest

from nitsum_jax.bench.workload import agent_workload, poisson_workload
from nitsum_jax.config import preset
from nitsum_jax.plans.spec import parse_plans
from nitsum_jax.scheduler import PriorityClass, default_classes
from nitsum_jax.sim import profile as P
from nitsum_jax.sim.driver import Simulation, SimSettings
from nitsum_jax.sim.lanes import Grid
from nitsum_jax.sim.partitions import adaptive_candidates, partition_name, partitions, static_baselines
from nitsum_jax.sim.run import Config, ControllerSettings, simulate_once
from nitsum_jax.sim.step_model import StepModel


def tiny_profile(tps=(1, 2, 4), chunks=None) -> dict:
    """A profile of the tiny shape whose figures are this test's inputs (named as such)."""
    from nitsum_jax.kv import kv_bytes_per_page

    cfg = preset("tiny")
    profile = P.empty_profile(P.model_shape(cfg), kv_bytes_per_page(cfg, 1), "gpu", None)
    profile["sources"]["fixture"] = {"card": "test fixture", "devices": 4, "date": "2026-12-01", "commit": None,
                                     "how": "figures written by the test"}
    for tp in tps:
        for c in chunks or (max(tps),):
            e = P.lane_entry(profile, tp, c)
            for context in (0, 64):
                e["decode"] += [{"batch": b, "context": context, "ms": 4.0 + 0.1 * b / tp + context / 400,
                                 "source": "fixture"} for b in (1, 2, 4, 8)]
                e["prefill"] += [{"tokens": t, "context": context, "ms": 4.0 + 0.05 * t / tp + context / 200,
                                  "source": "fixture"} for t in (16, 32)]
            e["sampler"] = [{"batch": b, "ms": 0.3, "source": "fixture"} for b in (1, 8)]
    profile["moves"] = [{"src_tp": a, "dst_tp": b, "shared_device": False, "tokens": 64, "GB_per_s": 1.0,
                         "source": "fixture"} for a in tps for b in tps]
    profile["switch_ms"] = {"ms": 0.05, "source": "fixture"}
    return P.validate(profile)


SETTINGS = SimSettings(grid=Grid((1, 2, 4, 8), (16, 32), 128), num_pages=64, page_size=8, token_budget=64)


def _workload(seed=0, rate=60.0, n=300):
    return poisson_workload(rate, num_requests=n, prompt_len="8-64", output_len="4-40", seed=seed, with_ids=False)


def _adaptive():
    name, plans = adaptive_candidates(4, default_classes())[0]
    return Config(name, plans, ControllerSettings(hold_s=0.05, min_dwell_s=0.1))


def test_the_same_seed_gives_the_same_records_and_decisions():
    model = StepModel(tiny_profile())
    a = simulate_once(model, default_classes(), _adaptive(), _workload(), SETTINGS)
    b = simulate_once(StepModel(tiny_profile()), default_classes(), _adaptive(), _workload(), SETTINGS)
    assert a["records"] == b["records"]
    assert a["backend"]["plan_switches"] == b["backend"]["plan_switches"]
    assert a["backend"]["plan_switches"], "the load should make the controller switch"
    c = simulate_once(model, default_classes(), _adaptive(), _workload(seed=1), SETTINGS)
    assert c["records"] != a["records"]


def test_every_submitted_request_has_one_record_and_finishes_by_length():
    workload = _workload(n=400, rate=200.0)
    run = simulate_once(StepModel(tiny_profile()), default_classes(), _adaptive(), workload, SETTINGS)
    assert [r["request_id"] for r in run["records"]] == workload.request_ids
    assert {r["status"] for r in run["records"]} == {"completed"}
    assert all(r["output_tokens"] == r["max_tokens"] and r["finish_reason"] == "length" for r in run["records"])
    assert all(r["first_token_s"] >= r["sent_s"] and r["finish_s"] >= r["first_token_s"] for r in run["records"])


def test_the_prefix_cache_hits_only_what_a_workload_says_is_shared():
    """A trace gives lengths only: no two prompts are known to share a page, so nothing hits.
    Agent chains carry their contents: each call reuses its conversation's earlier pages."""
    config = Config("static", adaptive_candidates(4, default_classes())[0][1][:1], None)
    lengths = simulate_once(StepModel(tiny_profile()), default_classes(), config, _workload(n=100), SETTINGS)
    assert lengths["backend"]["prefix_cache"]["total"]["cached_tokens"] == 0
    chains = agent_workload(4.0, "3:32:8", num_conversations=6, output_len="4-8", think_s=0.05, seed=2)
    agent = simulate_once(StepModel(tiny_profile()), default_classes(), config, chains, SETTINGS)
    total = agent["backend"]["prefix_cache"]["total"]
    assert {r["status"] for r in agent["records"]} == {"completed"}
    assert 0 < total["cached_tokens"] < total["prompt_tokens"]


def test_switch_moves_are_costed_by_the_profiles_bandwidth():
    """Moves between lanes of different plans take bytes / measured bandwidth; the switch log says so."""
    plans = adaptive_candidates(4, default_classes())[1][1]  # tp2+tp2 / reserve, with a tp4 light plan
    config = Config("with-moves", plans, ControllerSettings(hold_s=0.02, min_dwell_s=0.05))
    run = simulate_once(StepModel(tiny_profile()), default_classes(), config, _workload(n=300, rate=150.0), SETTINGS)
    moved = [s for s in run["backend"]["plan_switches"] if s["moved"]]
    assert moved, "switches between different lanes should move running sequences"
    for s in moved:  # the fixture's bandwidth is 1 GB/s
        assert s["move_s"] == pytest.approx(s["moved_bytes"] / 1e9, rel=1e-6)
        assert s["duration_s"] == pytest.approx(s["move_s"] + 0.05e-3, rel=1e-6)


def test_requests_longer_than_the_grid_are_rejected_like_the_engine():
    workload = poisson_workload(10.0, num_requests=20, prompt_len="100-120", output_len="30-40", with_ids=False)
    run = simulate_once(StepModel(tiny_profile()), default_classes(), _adaptive(), workload, SETTINGS)
    assert {r["status"] for r in run["records"]} == {"rejected"}
    assert "exceeds max_seq_len 128" in run["records"][0]["error"]


def test_partitions_of_four_devices_are_the_four_static_layouts():
    assert partitions(4) == [(4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)]
    assert [partition_name(p) for p in partitions(4)] == ["tp4", "tp2x2", "tp2+tp1+tp1", "tp1x4"]
    assert partitions(8, max_tp=2) == [(2, 2, 2, 2), (2, 2, 2, 1, 1), (2, 2, 1, 1, 1, 1), (2,) + (1,) * 6, (1,) * 8]


def test_static_baselines_are_each_partition_shared_then_each_dedicated_lane():
    plans = {p.name: [str(lane) for lane in p.lanes] for p in static_baselines(4, default_classes())}
    assert plans == {
        "static-tp4": ["all=tp4@0-3"], "static-tp2x2": ["all=tp2@0-1", "all=tp2@2-3"],
        "static-tp2+tp1+tp1": ["all=tp2@0-1", "all=tp1@2", "all=tp1@3"],
        "static-tp1x4": ["all=tp1@0", "all=tp1@1", "all=tp1@2", "all=tp1@3"],
        "dedicated-tp2-tp2x2": ["high=tp2@0-1", "all=tp2@2-3"],
        "dedicated-tp2-tp2+tp1+tp1": ["high=tp2@0-1", "all=tp1@2", "all=tp1@3"],
        "dedicated-tp1-tp2+tp1+tp1": ["all=tp2@0-1", "high=tp1@2", "all=tp1@3"],
        "dedicated-tp1-tp1x4": ["high=tp1@0", "all=tp1@1", "all=tp1@2", "all=tp1@3"]}


def test_a_lane_shape_missing_from_the_profile_is_named():
    with pytest.raises(P.ProfileError, match="no figures for a TP4 lane"):
        Simulation(StepModel(tiny_profile(tps=(1, 2))), default_classes(), static_baselines(4, default_classes())[:1])


def test_simulate_writes_the_bench_schema_with_best_static_comparison(tmp_path):
    from nitsum_jax.cli import main

    path = tmp_path / "p.json"
    P.save(tiny_profile(), path)
    out = tmp_path / "out"
    rc = main(["simulate", "--profile", str(path), "--rates", "40,120", "--num-requests", "120", "--prompt-len",
               "8-48", "--output-len", "4-24", "--num-devices", "4", "--max-seq-len", "128", "--num-pages", "64",
               "--page-size", "8", "--baselines", "best-static", "--plans",
               "static: all=tp4@0-3; mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; burst: all=tp2@0-1, low=tp1@2, "
               "low=tp1@3", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert {"adaptive", "static", "static-tp1x4", "dedicated-tp1-tp1x4"} <= set(results["configs"])
    assert all(len(c["by_rate"]) == 2 and c["sent"] == 120 for c in results["configs"].values())
    assert results["request_ids"]["same_across_configs"]
    row = results["best_static"]["rates"][1]["figures"]["goodput_rps"]
    statics = [n for n, c in results["configs"].items() if c["kind"] in ("shared", "dedicated")]
    assert row["best_static"] == max(results["configs"][n]["by_rate"][1]["goodput_rps"] for n in statics)
    assert (out / "report.md").exists() and (out / "requests.jsonl").exists()


def _high_tpot_p99(run) -> float:
    rows = [r for r in run["records"] if r["priority_class"] == "high" and (r["output_tokens"] or 0) > 1]
    return float(np.percentile([(r["finish_s"] - r["first_token_s"]) / (r["output_tokens"] - 1) for r in rows], 99))


def test_the_measured_token_budget_keeps_the_urgent_tpot_where_the_fixed_one_misses_it(tmp_path):
    """As the engine's `--token-budget auto`: a step that carries a 32-token prefill program takes
    about 10 ms in the fixture, past a 10 ms TPOT target once the batch grows; the measured budget
    learns that from the simulated steps and runs 16-token programs instead."""
    classes = {"high": PriorityClass("high", 0, ttft_target_s=2.0, tpot_target_s=0.010),
               "low": PriorityClass("low", 1, ttft_target_s=30.0, tpot_target_s=0.5)}
    workload = poisson_workload(40.0, num_requests=300, prompt_len="40-100", output_len="8-30", seed=0,
                                with_ids=False, high_fraction=0.5)
    static = Config("static", parse_plans("one: all=tp1@0"), None)
    runs = {b: simulate_once(StepModel(tiny_profile()), classes, static, workload,
                             dataclasses.replace(SETTINGS, token_budget=b)) for b in (64, "auto")}
    assert _high_tpot_p99(runs[64]) > 0.012
    assert _high_tpot_p99(runs["auto"]) <= 0.010
    assert [r["status"] for r in runs[64]["records"]] == [r["status"] for r in runs["auto"]["records"]]
    # the CLI takes it too, with a tiers file whose classes the workload splits evenly (as bench)
    from nitsum_jax.cli import main

    path, tiers = tmp_path / "p.json", tmp_path / "tiers.toml"
    P.save(tiny_profile(), path)
    tiers.write_text('[[class]]\nname = "rt"\nrank = 0\nttft_s = 2\ntpot_s = 0.01\n\n'
                     '[[class]]\nname = "bulk"\nrank = 1\nttft_s = 30\ntpot_s = 0.5\n')
    rc = main(["simulate", "--profile", str(path), "--rates", "40", "--num-requests", "100", "--prompt-len", "40-100",
               "--output-len", "8-30", "--num-devices", "1", "--configs", "static", "--max-seq-len", "128",
               "--num-pages", "64", "--page-size", "8", "--token-budget", "auto", "--classes", str(tiers),
               "--out", str(tmp_path / "out")])
    assert rc == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["workload"]["class_mix"]) == {"rt", "bulk"}


def test_plan_writes_a_plan_toml_the_engine_loads(tmp_path):
    from nitsum_jax.cli import main
    from nitsum_jax.plans.spec import load_plans_toml

    path = tmp_path / "p.json"
    P.save(tiny_profile(tps=(1, 2), chunks=(1, 2)), path)
    out = tmp_path / "plans.toml"
    rc = main(["plan", "--profile", str(path), "--rates", "80", "--num-requests", "60", "--prompt-len", "8-48",
               "--output-len", "4-24", "--num-devices", "2", "--max-seq-len", "128", "--num-pages", "64",
               "--page-size", "8", "--tick-ms", "20", "--no-progress", "--out", str(out)])
    assert rc == 0
    plans = load_plans_toml(out)
    assert {p.name for p in plans} == {"shared", "reserved", "throughput"}
    assert "[controller]" in out.read_text()


def _one_lane_results(points, rates) -> dict:
    """A bench results.json of one lane: runs whose idle time per unchained step is `gap_ms` at
    `rows` output tokens per step (the test's inputs)."""
    runs = []
    for (rows, gap_ms), rate in zip(points, rates):
        steps, chained, busy = 1000, 400, 10.0
        span = busy + gap_ms / 1e3 * (steps - chained)
        runs.append({"rate_rps": rate, "steps": {"tp1@0": steps}, "chained_steps": {"tp1@0": chained},
                     "lane_busy_s": {"tp1@0": busy}, "span_s": span, "output_tokens_per_s": rows * steps / span})
    two_lanes = dict(runs[0], lane_busy_s={"tp1@0": 5.0, "tp1@1": 5.0}, rate_rps=99.0)
    return {"configs": {"static": {"by_rate": runs + [two_lanes]}},
            "machine": {"device_kind": "test card", "device_count": 1}, "date": "2026-12-02T00:00:00", "git": None}


def test_a_host_fit_is_the_line_through_the_fitted_runs_with_the_rest_held_out(tmp_path):
    from nitsum_jax.cli import main

    points = [(10.0, 0.3 + 0.01 * 10), (40.0, 0.3 + 0.01 * 40), (80.0, 1.5)]
    (tmp_path / "p.json").write_text(json.dumps(tiny_profile(tps=(1,))))
    (tmp_path / "r.json").write_text(json.dumps(_one_lane_results(points, (10.0, 24.0, 32.0))))
    assert main(["profile", "host", str(tmp_path / "p.json"), str(tmp_path / "r.json"), "--fit-rates", "10,24",
                 "--commit", "abc1234", "--out", str(tmp_path / "q.json")]) == 0
    fitted = P.load(tmp_path / "q.json")
    host = fitted["host"]
    assert host["per_step_ms"] == pytest.approx(0.3) and host["per_row_ms"] == pytest.approx(0.01)
    assert [(p["rate_rps"], p["held_out"]) for p in host["points"]] == [(10.0, False), (24.0, False), (32.0, True)]
    assert host["points"][2]["fit_ms"] == pytest.approx(1.1) and host["points"][2]["gap_ms"] == pytest.approx(1.5)
    assert fitted["sources"][host["source"]]["commit"] == "abc1234"  # the run of two lanes is not a point
    with pytest.raises(P.ProfileError, match="two loads"):
        P.host_fit(tiny_profile(tps=(1,)), [_one_lane_results(points[:1], (10.0,))], "h", {})


def test_the_host_time_idles_the_device_before_steps_that_are_not_chained():
    config = Config("static", adaptive_candidates(4, default_classes())[0][1][:1], None)
    plain = tiny_profile()
    slow = dict(plain, host={"per_step_ms": 2.0, "per_row_ms": 0.5, "points": [], "source": "fixture"})
    runs = [simulate_once(StepModel(P.validate(p)), default_classes(), config, _workload(n=200), SETTINGS)
            for p in (plain, slow)]
    assert [{r["status"] for r in run["records"]} for run in runs] == [{"completed"}] * 2
    busy = [run["backend"]["device_busy_fraction"] for run in runs]
    assert busy[1] < busy[0] - 0.05
    finish = [max(r["finish_s"] for r in run["records"]) for run in runs]
    assert finish[1] > finish[0]
