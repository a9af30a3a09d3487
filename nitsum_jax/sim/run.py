"""`simulate`: configurations (the adaptive plan set, its static plan, the static baselines) over
the same workloads on the virtual clock; results in the bench's `results.json` schema, summarized
by the bench's own `summarize`, written with its report and plots."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from nitsum_jax.bench.metrics import ratios, summarize
from nitsum_jax.bench.workload import Workload
from nitsum_jax.plans.spec import Plan
from nitsum_jax.scheduler import PriorityClass, by_rank
from nitsum_jax.scheduler.controller import PlanController
from nitsum_jax.sim.driver import Simulation, SimSettings
from nitsum_jax.sim.step_model import StepModel


@dataclasses.dataclass(frozen=True)
class ControllerSettings:
    hold_s: float = 0.5  # `Engine.build`'s defaults
    min_dwell_s: float = 1.0
    slo_floor: float = 0.9


@dataclasses.dataclass(frozen=True)
class Config:
    """A configuration to simulate: a plan set; with `controller` it adapts, else its first plan stays."""

    name: str
    plans: tuple[Plan, ...]
    controller: ControllerSettings | None = None
    kind: str = "adaptive"  # "adaptive" | "static" | "shared" | "dedicated"


def simulate_once(model: StepModel, classes: dict[str, PriorityClass], config: Config, workload: Workload,
                  settings: SimSettings) -> dict:
    """One configuration over one workload: {"records", "wall_s" (host seconds), "backend": window stats}."""
    controller = None
    if config.controller is not None:
        c = config.controller
        controller = PlanController(config.plans, config.plans[0].name, classes=classes, hold_s=c.hold_s,
                                    min_dwell_s=c.min_dwell_s, slo_floor=c.slo_floor)
    sim = Simulation(model, classes, config.plans if controller else config.plans[:1], settings, controller)
    t0, cpu0 = time.perf_counter(), time.process_time()
    records = sim.run(workload.requests)
    return {"records": records, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
            "backend": sim.window_stats(),
            "fallbacks": {**{k: v for k, v in model.fallbacks.items()},
                          **{str(k): str(v) for k, v in sim.moves.fallbacks.items()}}}


def slo_table(classes: dict[str, PriorityClass]) -> dict:
    return {c.name: {"ttft_target_s": c.ttft_target_s, "tpot_target_s": c.tpot_target_s} for c in by_rank(classes)}


def run_configs(model: StepModel, classes: dict[str, PriorityClass], configs: Sequence[Config],
                workloads: list[Workload], settings: SimSettings,
                on_run: Callable[[str, float], None] | None = None) -> dict:
    """Every configuration over every workload. Returns the bench's results (plus `sim`)."""
    slo = slo_table(classes)
    targets = {c: (t["ttft_target_s"], t["tpot_target_s"]) for c, t in slo.items()}
    results = {"schema_version": 1, "workload": dict(workloads[0].params),
               "rates_rps": [w.params["rate_rps"] for w in workloads], "headline_rate_index": 0,
               "headline_rate_rps": workloads[0].params["rate_rps"], "configs": {}, "requests": [], "slo": slo}
    if len(workloads) > 1:
        results["workload"] |= {"rate_rps": results["rates_rps"], "num_requests": [len(w.requests) for w in workloads]}
    for config in configs:
        runs, ids = [], []
        for k, workload in enumerate(workloads):
            run = simulate_once(model, classes, config, workload, settings)
            end = max([r["finish_s"] or 0.0 for r in run["records"]] + [workload.duration_s])
            summary = summarize(run["records"], targets, end)
            window = run["backend"]
            runs.append({"rate_rps": workload.params["rate_rps"], **summary, "sim_host_s": run["wall_s"], "sim_cpu_s": run["cpu_s"],
                         "device_busy_fraction": window["device_busy_fraction"], "gpu_utilization_pct": None,
                         "host_cpu_fraction": None, "plan_switches": len(window["plan_switches"]),
                         "kv_moves": window["kv_moves"], "preemptions": window["preemptions"],
                         "plan_history": window["plan_history"], "plan_switch_log": window["plan_switches"],
                         "lane_busy_s": window["lane_busy_s"], "steps": window["steps"], "chained_steps": None,
                         "sampler_runs": None, "fallbacks": run["fallbacks"]})
            results["requests"] += [{"config": config.name, "rate_index": k, "rate_rps": workload.params["rate_rps"],
                                     **r} for r in run["records"]]
            ids += [r["request_id"] for r in run["records"]]
            if on_run:
                on_run(config.name, workload.params["rate_rps"])
        results["configs"][config.name] = {
            **runs[0], "startup_s": None, "by_rate": runs, "request_ids": ids, "kind": config.kind,
            "backend": {"plans": "; ".join(str(p) for p in (config.plans if config.controller else config.plans[:1])),
                        "controller": dataclasses.asdict(config.controller) if config.controller else None}}
    return results


def finish(results: dict, model: StepModel, settings: SimSettings, profile_path: str | None) -> None:
    """The bench's closing fields, for a simulated run."""
    from nitsum_jax.bench.environment import git_commit, machine_info

    profile = model.profile
    names = list(results["configs"])
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["git"] = git_commit()
    cards = sorted({s.get("card", "?") for s in profile["sources"].values()})
    results["machine"] = machine_info(with_jax=False) | {
        "jax": "none (simulated)", "backend": "simulator", "device_kind": f"simulated {' / '.join(cards)}",
        "device_count": max(d for c in results["configs"].values() for d in _devices(c))}
    results["model"] = f"profile:{profile_path or '<in memory>'}"
    results["counts"] = {name: {key: sum(run[key] for run in results["configs"][name]["by_rate"])
                                for key in ("sent", "completed", "rejected", "failed")} for name in names}
    ids = {name: results["configs"][name]["request_ids"] for name in names}
    results["request_ids"] = {"count": len(ids[names[0]]),
                              "same_across_configs": all(v == ids[names[0]] for v in ids.values())}
    results["sim"] = {"settings": dataclasses.asdict(settings), "profile_sources": profile["sources"],
                      "held_out_error": model.held_out_error(), "coverage": model.coverage(),
                      "lane_fallbacks": dict(model.fallbacks)}
    if "static" in results["configs"] and "adaptive" in results["configs"]:
        results["ratios"] = {"adaptive/static": ratios(results["configs"]["adaptive"], results["configs"]["static"])}


def _devices(config: dict) -> list[int]:
    from nitsum_jax.plans.spec import parse_lane

    lanes = [s.strip() for p in config["backend"]["plans"].split(";") for s in p.split(":", 1)[1].split(",")]
    return [max(parse_lane(lane).devices) + 1 for lane in lanes if lane]
