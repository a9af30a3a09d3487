"""`run_bench`: build each configuration, play the same workload(s) to it, summarize, write files.

Returns plain data: the content of results.json plus `requests` (one record per request and
run, for `pandas.DataFrame(results["requests"])` or `to_frames(results)`).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Sequence

from nitsum_jax.bench.environment import NvmlSampler, git_commit, machine_info
from nitsum_jax.bench.metrics import ratios, summarize
from nitsum_jax.bench.runner import run_workload
from nitsum_jax.bench.workload import Workload, load_trace, poisson_workload

CONFIGS = ("static", "adaptive")
# The default run: short enough for a 2-core CPU machine, long enough for the controller to act.
DEFAULTS = {"rates": (16.0,), "duration_s": 15.0, "high_fraction": 0.3, "prompt_len": "8-48",
            "output_len": "16-48", "seed": 0, "num_pages": 96, "page_size": 8}


def default_grid():
    """A small shape grid: few compilations at start-up, sequences up to 128 tokens."""
    from nitsum_jax.plans import BucketGrid

    return BucketGrid(decode_batch=(8,), prefill_len=(32,), max_seq_len=128, min_move_pages=128 // 8)


def make_workloads(rates: Sequence[float], *, trace: str | None = None, time_scale: float = 1.0,
                   target_rates: Sequence[float] | None = None, with_ids: bool = True,
                   **poisson_kwargs) -> list[Workload]:
    """One workload per rate (or the trace: once at `time_scale`, or once per target rate); the
    same seed for every rate and configuration. `poisson_kwargs` go to `poisson_workload`
    (`burstiness`, `class_mix`, lengths, ...); a trace takes its `seed`, `class_mix`,
    `high_fraction` and `limit` (its first this many requests)."""
    if trace:
        keep = {k: poisson_kwargs[k] for k in ("seed", "class_mix", "high_fraction", "limit") if k in poisson_kwargs}
        if not target_rates:
            return [load_trace(trace, time_scale=time_scale, with_ids=with_ids, **keep)]
        return [load_trace(trace, target_rate=rate, with_ids=with_ids, id_prefix="r" if len(target_rates) == 1
                           else f"rate{k}-r", **keep) for k, rate in enumerate(target_rates)]
    return [poisson_workload(rate, id_prefix="r" if len(rates) == 1 else f"rate{k}-r", with_ids=with_ids,
                             **poisson_kwargs) for k, rate in enumerate(rates)]


def run_bench(*, configs: Sequence[str] = CONFIGS, rates: Sequence[float] = DEFAULTS["rates"],
              duration_s: float | None = DEFAULTS["duration_s"], num_requests: int | None = None,
              high_fraction: float = DEFAULTS["high_fraction"], prompt_len: str = DEFAULTS["prompt_len"],
              output_len: str = DEFAULTS["output_len"], seed: int = DEFAULTS["seed"], trace: str | None = None,
              time_scale: float = 1.0, target_rates: Sequence[float] | None = None, burstiness: float = 1.0,
              class_mix: dict[str, float] | None = None, workloads: list[Workload] | None = None, preset: str = "tiny",
              checkpoint: str | None = None, plans: str | None = None, static_plan: str | None = None,
              num_devices: int | None = None, grid=None,
              num_pages: int = DEFAULTS["num_pages"], page_size: int = DEFAULTS["page_size"],
              engine_kwargs: dict | None = None, target: str | None = None, api_key: str | None = None,
              drain_timeout_s: float = 120.0, out_dir: str | Path | None = None, console=None,
              progress: bool = True, sampled_fraction: float = 0.0, temperature: float = 0.8,
              switch_probe: bool = True, baselines: str | None = None) -> dict:
    """Run every configuration on the same workloads, one after the other.

    configs: "static" (the plan set's static plan alone, no controller) and/or "adaptive" (the
    plan set with the controller); with `target` (host:port of a running server) one
    configuration, "server", is measured instead. static_plan: the static configuration's plan
    when it is not the plan set's `static` plan. rates: a Poisson workload per rate; the
    first is the headline rate of `configs.<name>`. sampled_fraction: share of requests that
    sample at `temperature` (the rest are greedy). trace: a CSV or JSONL trace
    (`nitsum_jax.bench.trace`) instead of Poisson arrivals, replayed at `time_scale` or once per
    rate of `target_rates`. burstiness: gamma arrivals (1 is Poisson). class_mix: class -> share.
    switch_probe: after its runs, each in-process engine with several lanes or plans times its
    plan switches and KV moves while idle
    (`Engine.measure_switch_costs`, in `configs.<name>.switch_probe`). baselines "best-static":
    also every static partition of the devices, shared and dedicated (`sim.partitions`), each its
    own engine without a controller, and `best_static`: adaptive against the best of each figure
    (`sim.baselines`). Writes results.json,
    requests.jsonl, report.md and PNG plots into `out_dir` when given."""
    from rich.console import Console

    console = console or Console(quiet=not progress)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    if workloads is None:
        workloads = make_workloads(rates, trace=trace, time_scale=time_scale, target_rates=target_rates,
                                   burstiness=burstiness, class_mix=class_mix, duration_s=duration_s,
                                   num_requests=num_requests, high_fraction=high_fraction, prompt_len=prompt_len,
                                   output_len=output_len, seed=seed, sampled_fraction=sampled_fraction,
                                   temperature=temperature)
    names = ["server"] if target else list(configs)
    static_plans = {name: static_plan for name in names}
    if baselines is not None and not target:
        for plan in _static_baselines(baselines, num_devices, engine_kwargs):
            names.append(plan.name)
            static_plans[plan.name] = str(plan)
    engine_kwargs = dict(engine_kwargs or {})
    engine_kwargs.setdefault("grid", grid or default_grid())
    engine_kwargs.setdefault("num_pages", num_pages)
    engine_kwargs.setdefault("page_size", page_size)
    nvml = NvmlSampler()
    results = {"schema_version": 1, "model": checkpoint or f"preset:{preset}",
               "workload": dict(workloads[0].params), "rates_rps": [w.params["rate_rps"] for w in workloads],
               "headline_rate_index": 0, "headline_rate_rps": workloads[0].params["rate_rps"], "configs": {},
               "requests": []}
    if len(workloads) > 1:
        results["workload"] |= {"rate_rps": results["rates_rps"],
                                "num_requests": [len(w.requests) for w in workloads]}
    for name in names:
        backend, startup_s = _open_backend(name, console, target=target, api_key=api_key, preset=preset,
                                           checkpoint=checkpoint, plans=plans, static_plan=static_plans[name],
                                           num_devices=num_devices, engine_kwargs=engine_kwargs)
        try:
            results.setdefault("slo", _slo(backend))
            runs = []
            for k, workload in enumerate(workloads):
                label = f"{name} @ {workload.params['rate_rps']:.3g} req/s"
                run = _measured_run(backend, workload, label, console, progress, nvml, drain_timeout_s)
                summary = summarize(run["records"], {c: (t["ttft_target_s"], t["tpot_target_s"])
                                                     for c, t in results["slo"].items()}, run["wall_s"])
                window = run["backend"]
                runs.append({"rate_rps": workload.params["rate_rps"], **summary,
                             "device_busy_fraction": window.get("device_busy_fraction"),
                             "gpu_utilization_pct": run["gpu_utilization_pct"],
                             "host_cpu_fraction": run["host_cpu_fraction"],
                             "plan_switches": len(window.get("plan_switches") or []),
                             "kv_moves": window.get("kv_moves"), "preemptions": window.get("preemptions"),
                             "plan_history": window.get("plan_history") or [],
                             "plan_switch_log": window.get("plan_switches") or [],
                             "lane_busy_s": window.get("lane_busy_s"), "steps": window.get("steps"),
                             "chained_steps": window.get("chained_steps"),
                             "sampler_runs": window.get("sampler_runs"),
                             "prefix_cache": window.get("prefix_cache")})
                results["requests"] += [{"config": name, "rate_index": k, "rate_rps": workload.params["rate_rps"],
                                         **r} for r in run["records"]]
            head = runs[0]
            results["configs"][name] = {**head, "startup_s": startup_s, "backend": backend.info(), "by_rate": runs,
                                        "request_ids": [r["request_id"] for r in results["requests"]
                                                        if r["config"] == name]}
            if switch_probe and hasattr(backend, "switch_costs"):
                with console.status(f"{name}: timing plan switches and KV moves on the idle engine"):
                    try:
                        probe = backend.switch_costs()
                    except Exception as error:  # e.g. out of device memory: the runs' figures stand
                        probe = {"error": f"{type(error).__name__}: {error}"}
                        console.log(f"{name}: switch-cost probe failed: {probe['error']}")
                if probe is not None:
                    results["configs"][name]["switch_probe"] = probe
        finally:
            backend.close()
    _finish(results, names, target)
    if baselines is not None and "adaptive" in results["configs"]:
        from nitsum_jax.scheduler import by_rank, default_classes
        from nitsum_jax.sim.baselines import compare

        for name, c in results["configs"].items():
            c["kind"] = name if name in CONFIGS else "dedicated" if name.startswith("dedicated") else "shared"
        urgent = by_rank((engine_kwargs or {}).get("classes") or default_classes())[0].name
        results["best_static"] = compare(results, "adaptive", urgent)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


def _static_baselines(kind: str, num_devices: int | None, engine_kwargs: dict | None) -> list:
    if kind != "best-static":
        raise ValueError(f"unknown baselines {kind!r}; known: best-static")
    import jax

    from nitsum_jax.scheduler import default_classes
    from nitsum_jax.sim.partitions import static_baselines

    return static_baselines(num_devices or jax.device_count(), (engine_kwargs or {}).get("classes") or default_classes())


def _open_backend(name, console, *, target, api_key, preset, checkpoint, plans, static_plan, num_devices,
                  engine_kwargs):
    from nitsum_jax.bench.backends import EngineBackend, open_target

    t0 = time.perf_counter()
    if target:
        return open_target(target, name, api_key=api_key), time.perf_counter() - t0
    with console.status(f"building the {name} engine (loading weights, compiling every lane of its plans)"):
        backend = EngineBackend.build(name, adaptive=name == "adaptive", preset=preset, checkpoint=checkpoint,
                                      plans=plans, static_plan=static_plan, num_devices=num_devices,
                                      **engine_kwargs)
        backend.warm_up(sorted(backend.classes))
    startup_s = time.perf_counter() - t0
    console.log(f"{name}: ready in {startup_s:.1f} s; {backend.description}")
    return backend, startup_s


def _measured_run(backend, workload, label, console, progress, nvml, drain_timeout_s) -> dict:
    import psutil
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=False)
    psutil.cpu_percent(None)
    nvml.start()
    with bar if progress else contextlib.nullcontext():
        task = bar.add_task(label, total=len(workload.requests))
        run = run_workload(backend, workload, drain_timeout_s=drain_timeout_s,
                           on_finished=lambda n: bar.advance(task, n))
    run["gpu_utilization_pct"] = nvml.stop()
    run["host_cpu_fraction"] = psutil.cpu_percent(None) / 100
    return run


def _slo(backend) -> dict:
    if hasattr(backend, "classes"):
        classes = backend.classes
    else:
        from nitsum_jax.scheduler import default_classes

        classes = default_classes()
    return {c.name: {"ttft_target_s": c.ttft_target_s, "tpot_target_s": c.tpot_target_s}
            for c in sorted(classes.values(), key=lambda c: c.rank)}


def _finish(results: dict, names: list[str], target: str | None) -> None:
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["git"] = git_commit()
    results["machine"] = machine_info(with_jax=target is None)
    results["counts"] = {
        name: {key: sum(run[key] for run in results["configs"][name]["by_rate"])
               for key in ("sent", "completed", "rejected", "failed")} for name in names}
    ids = {name: results["configs"][name]["request_ids"] for name in names}
    results["request_ids"] = {"count": len(ids[names[0]]), "same_across_configs": all(
        v == ids[names[0]] for v in ids.values())}
    if "static" in results["configs"] and "adaptive" in results["configs"]:
        static, adaptive = results["configs"]["static"], results["configs"]["adaptive"]
        results["ratios"] = {"adaptive/static": ratios(adaptive, static)}


def write_outputs(results: dict, out_dir: str | Path) -> None:
    """results.json, requests.jsonl, report.md and the PNG plots."""
    from nitsum_jax.bench.plots import save_plots
    from nitsum_jax.bench.report import markdown_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = save_plots(results, out)
    with open(out / "requests.jsonl", "w") as f:
        for record in results["requests"]:
            f.write(json.dumps(record) + "\n")
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "requests"}, indent=2))
    (out / "report.md").write_text(markdown_report(results))


def to_frames(results: dict) -> dict:
    """pandas DataFrames: `requests` (one row per request and run), `runs` (one per configuration
    and rate) and `classes` (one per configuration, rate and class)."""
    import pandas as pd

    runs, classes = [], []
    for name, c in results["configs"].items():
        for run in c["by_rate"]:
            runs.append({"config": name, **{k: v for k, v in run.items()
                                            if k not in ("classes", "plan_history", "plan_switch_log")}})
            classes += [{"config": name, "rate_rps": run["rate_rps"], "class": cls, **v}
                        for cls, v in run["classes"].items()]
    return {"requests": pd.DataFrame(results.get("requests", [])), "runs": pd.DataFrame(runs),
            "classes": pd.DataFrame(classes)}
