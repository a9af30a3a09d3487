"""`nitsum-jax plan`: the plan set and controller settings with the highest SLO goodput on a
workload, found by simulation, against every static deployment of the same devices.

Two stages: every adaptive candidate (`partitions.adaptive_candidates`) at the engine's default
controller settings, then the best few over a grid of hold, dwell and SLO floor. The score is
the SLO goodput summed over the workloads (rates); ties go to the lower urgent-tier TTFT p99.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

from nitsum_jax.bench.metrics import summarize
from nitsum_jax.bench.workload import Workload
from nitsum_jax.plans.spec import Plan
from nitsum_jax.scheduler import PriorityClass, by_rank
from nitsum_jax.sim.driver import SimSettings
from nitsum_jax.sim.partitions import adaptive_candidates, static_baselines
from nitsum_jax.sim.run import Config, ControllerSettings, simulate_once, slo_table
from nitsum_jax.sim.step_model import StepModel

HOLD_S, DWELL_S, SLO_FLOOR = (0.1, 0.5, 1.0), (0.5, 2.0), (0.8, 0.95)
REFINED = 2  # candidates of the first stage whose controller settings are searched


@dataclasses.dataclass
class Scored:
    config: Config
    runs: list[dict]  # summaries per workload
    plan_time: dict[str, float]  # plan -> share of the (headline) run's time in force

    @property
    def goodput(self) -> float:
        return sum(r["goodput_rps"] for r in self.runs)

    def urgent_ttft(self, urgent: str) -> float:
        values = [r["classes"].get(urgent, {}).get("ttft_p99_s") for r in self.runs]
        return max((v for v in values if v is not None), default=float("inf"))


def _score(model, classes, config: Config, workloads: list[Workload], settings: SimSettings) -> Scored:
    targets = {c: (t["ttft_target_s"], t["tpot_target_s"]) for c, t in slo_table(classes).items()}
    runs, plan_time = [], {}
    for k, workload in enumerate(workloads):
        run = simulate_once(model, classes, config, workload, settings)
        end = max([r["finish_s"] or 0.0 for r in run["records"]] + [workload.duration_s])
        runs.append(summarize(run["records"], targets, end))
        if k == 0:
            plan_time = _plan_time(run["backend"]["plan_history"], end)
    return Scored(config, runs, plan_time)


def _plan_time(history: list[tuple[float, str]], end: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for (t, plan), nxt in zip(history, [t for t, _ in history[1:]] + [end]):
        out[plan] = out.get(plan, 0.0) + max(0.0, nxt - t)
    total = sum(out.values()) or 1.0
    return {p: s / total for p, s in out.items()}


def search(model: StepModel, classes: dict[str, PriorityClass], workloads: list[Workload], settings: SimSettings,
           num_devices: int, max_tp: int | None = None, advance: Callable[[str], None] = lambda what: None,
           on_total: Callable[[int], None] = lambda n: None) -> dict:
    """{"best": Scored, "adaptive": [Scored], "statics": [Scored], "urgent": class name}."""
    urgent = by_rank(classes)[0].name
    candidates = adaptive_candidates(num_devices, classes, max_tp)
    statics = static_baselines(num_devices, classes, max_tp)
    grid = list(itertools.product(HOLD_S, DWELL_S, SLO_FLOOR))
    on_total(len(candidates) + len(statics) + min(REFINED, len(candidates)) * len(grid))
    scored_statics = []
    for plan in statics:
        kind = "dedicated" if plan.name.startswith("dedicated") else "shared"
        scored_statics.append(_score(model, classes, Config(plan.name, (plan,), None, kind), workloads, settings))
        advance(plan.name)
    first = []
    for name, plans in candidates:
        first.append(_score(model, classes, Config(name, plans, ControllerSettings()), workloads, settings))
        advance(name)
    ranked = sorted(first, key=lambda s: (-s.goodput, s.urgent_ttft(urgent)))
    refined = list(ranked)
    for top in ranked[:REFINED]:
        for hold, dwell, floor in grid:
            config = dataclasses.replace(top.config, controller=ControllerSettings(hold, dwell, floor))
            refined.append(_score(model, classes, config, workloads, settings))
            advance(f"{top.config.name} hold {hold} dwell {dwell} floor {floor}")
    best = min(refined, key=lambda s: (-s.goodput, s.urgent_ttft(urgent)))
    return {"best": best, "adaptive": refined, "statics": scored_statics, "urgent": urgent}


def best_static(statics: list[Scored], urgent: str) -> Scored:
    return min(statics, key=lambda s: (-s.goodput, s.urgent_ttft(urgent)))


def explain(found: dict, classes: dict[str, PriorityClass]) -> list[str]:
    """Why the winner wins: its goodput against the best static's, and which tier had which lane when."""
    best, urgent = found["best"], found["urgent"]
    static = best_static(found["statics"], urgent)
    ratio = best.goodput / static.goodput if static.goodput else float("inf")
    lines = [f"winner: {best.config.name}, controller {dataclasses.asdict(best.config.controller)}",
             f"SLO goodput {best.goodput:.2f} req/s (summed over rates) against the best static "
             f"{static.config.name}'s {static.goodput:.2f}: {ratio:.2f}x"]
    for plan in best.config.plans:
        share = best.plan_time.get(plan.name, 0.0)
        lines.append(f"  {plan.name} ({', '.join(map(str, plan.lanes))}): in force {100 * share:.0f}% of the "
                     f"first rate's run")
    for run_a, run_s, w in zip(best.runs, static.runs, range(len(best.runs))):
        for c in by_rank(classes):
            a, s = run_a["classes"].get(c.name, {}), run_s["classes"].get(c.name, {})
            lines.append(f"  rate {w}: {c.name} SLO met {_pct(a.get('slo_attainment'))} against "
                         f"{_pct(s.get('slo_attainment'))}, TTFT p99 {_ms(a.get('ttft_p99_s'))} against "
                         f"{_ms(s.get('ttft_p99_s'))}, TPOT p99 {_ms(a.get('tpot_p99_s'))} against "
                         f"{_ms(s.get('tpot_p99_s'))}")
    if ratio <= 1.0:
        lines.append("adaptivity does not win on this workload: the best plan set is no better than the best "
                     "static deployment (write the static plan, or keep the adaptive set for its urgent-tier latency)")
    return lines


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def plan_toml(plans: tuple[Plan, ...], controller: ControllerSettings | None, header: list[str]) -> str:
    """A plan file `serve`, `bench` and `simulate` accept (`plans.spec.load_plans_toml`); the
    controller settings go in a `[controller]` table beside the plans."""
    lines = [f"# {line}" for line in header] + [""]
    for plan in plans:
        lanes = ", ".join(f'"{lane}"' for lane in plan.lanes)
        lines += ["[[plan]]", f'name = "{plan.name}"', f"lanes = [{lanes}]", ""]
    if controller is not None:
        lines += ["[controller]"] + [f"{k} = {v}" for k, v in dataclasses.asdict(controller).items()] + [""]
    return "\n".join(lines)
