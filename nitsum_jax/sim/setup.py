"""From command-line arguments to a simulation: profile, tiers, workloads, engine settings, plans;
and the two commands' bodies (`simulate`, `plan`)."""

from __future__ import annotations

import sys
import time

from nitsum_jax.sim import profile as P
from nitsum_jax.sim.driver import SimSettings
from nitsum_jax.sim.lanes import Grid
from nitsum_jax.sim.step_model import StepModel


def model_config(profile: dict, max_seq_len: int):
    """A LlamaConfig of the profile's model shape (plans are validated against it)."""
    from nitsum_jax.config import LlamaConfig

    return LlamaConfig(**profile["model"], max_seq_len=max_seq_len)


def fit_pages(cfg, plans, device_memory_bytes: int | None, page_size: int, grid: Grid) -> tuple[int, str]:
    """The most KV pages per lane whose weights + KV + workspace fit every device (the engine's
    memory model, `plans.memory`), and how that number was chosen."""
    if not device_memory_bytes:
        return 4096, "4096 (the profile records no device memory)"
    from nitsum_jax.plans.layout import assign_chunks
    from nitsum_jax.plans.memory import MemoryBudget, memory_report

    layouts = assign_chunks(plans, cfg)

    def fits(pages: int) -> bool:
        budget = MemoryBudget(pages, page_size, grid.decode_batch[-1], grid.prefill_len[-1])
        report = memory_report(cfg, plans, layouts, budget)
        return all(d["total"] <= device_memory_bytes for d in report["devices"].values())

    lo, hi = 0, 1 << 22
    while lo < hi:  # the largest page count that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    if lo == 0:
        raise P.ProfileError(f"the plan set's weights do not fit {device_memory_bytes / 2**30:.1f} GiB devices")
    return lo, f"{lo} (fits {device_memory_bytes / 2**30:.1f} GiB devices, plans.memory)"


def load_inputs(args) -> dict:
    from nitsum_jax.bench.api import make_workloads
    from nitsum_jax.bench.workload import parse_class_mix
    from nitsum_jax.scheduler import default_classes, load_classes

    profile = P.load(args.profile)
    model = StepModel(profile)
    classes = load_classes(args.classes) if args.classes else default_classes()
    lanes = list(profile["lanes"].values())
    grid = Grid(tuple(args.decode_batch or sorted({r["batch"] for lane in lanes for r in lane["decode"]})),
                tuple(args.prefill_len or sorted({r["tokens"] for lane in lanes for r in lane["prefill"]})
                      or (256,)), args.max_seq_len)
    mix = parse_class_mix(args.class_mix) if args.class_mix else None
    if args.classes and mix is None:
        mix = {name: 1.0 / len(classes) for name in classes}  # as `bench`: a tiers file's classes evenly
    extra = {"limit": args.trace_limit} if args.trace else {}
    workloads = make_workloads(args.rates, trace=args.trace, time_scale=args.time_scale, target_rates=args.target_rates,
                               with_ids=False, burstiness=args.burstiness, class_mix=mix, **extra,
                               duration_s=None if args.num_requests else args.duration, num_requests=args.num_requests,
                               high_fraction=args.high_fraction, prompt_len=args.prompt_len,
                               output_len=args.output_len, seed=args.seed)
    unknown = sorted({r.priority_class for w in workloads for r in w.requests} - set(classes))
    if unknown:
        raise ValueError(f"the workload has class(es) {unknown} that the tiers do not define ({sorted(classes)})")
    return {"profile": profile, "model": model, "classes": classes, "grid": grid, "workloads": workloads,
            "cfg": model_config(profile, args.max_seq_len)}


def settings_for(args, inputs: dict, plans) -> tuple[SimSettings, str]:
    if args.num_pages:
        pages, why = args.num_pages, f"{args.num_pages} (given)"
    else:
        pages, why = fit_pages(inputs["cfg"], plans, inputs["profile"].get("device_memory_bytes"), args.page_size,
                               inputs["grid"])
    return SimSettings(grid=inputs["grid"], num_pages=pages, page_size=args.page_size, token_budget=args.token_budget,
                       tick_s=args.tick_ms / 1e3), why


def _devices(args, plans=None) -> int:
    if args.num_devices:
        return args.num_devices
    if plans:
        return max(d for p in plans for lane in p.lanes for d in lane.devices) + 1
    return 4


def run_simulate(args) -> int:
    from rich.console import Console

    from nitsum_jax.bench.api import write_outputs
    from nitsum_jax.bench.report import print_tables
    from nitsum_jax.plans.spec import read_plans
    from nitsum_jax.scheduler import by_rank
    from nitsum_jax.sim import baselines
    from nitsum_jax.sim.partitions import static_baselines
    from nitsum_jax.sim.run import Config, ControllerSettings, finish, run_configs

    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        inputs = load_inputs(args)
        classes = inputs["classes"]
        n = args.num_devices or 4
        plans = read_plans(args.plans, n, inputs["cfg"], tuple(c.name for c in by_rank(classes)))
        n = _devices(args, plans)
        configs = []
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        if "adaptive" in names:
            configs.append(Config("adaptive", plans, controller_settings(args)))
        static = next((p for p in plans if p.name == "static"), None)
        if "static" in names and static is not None:
            configs.append(Config("static", (static,), None, "static"))
        if args.baselines == "best-static":
            configs += [Config(p.name, (p,), None, "dedicated" if p.name.startswith("dedicated") else "shared")
                        for p in static_baselines(n, classes, _largest_tp(inputs["cfg"], n))]
        every_plan = tuple({str(p): p for c in configs for p in c.plans}.values())
        settings, pages_why = settings_for(args, inputs, every_plan)
        t0 = time.perf_counter()
        with console.status("simulating") as status:
            results = run_configs(inputs["model"], classes, configs, inputs["workloads"], settings,
                                  on_run=lambda name, rate: status.update(f"simulated {name} @ {rate:.3g} req/s"))
    except (ValueError, OSError) as error:
        print(f"nitsum-jax: error: {error}", file=sys.stderr)
        return 2
    finish(results, inputs["model"], settings, args.profile)
    results["sim"] |= {"host_s": time.perf_counter() - t0, "num_pages_chosen": pages_why}
    if args.baselines and "adaptive" in results["configs"]:
        results["best_static"] = baselines.compare(results, "adaptive", by_rank(classes)[0].name)
    write_outputs(results, args.out)
    print_tables(results, console)
    if results.get("best_static"):
        _print_comparison(results["best_static"], console)
    console.print(f"simulated in {results['sim']['host_s']:.1f} s of host time; KV pages per lane {pages_why}; "
                  f"wrote {args.out}/results.json, report.md, requests.jsonl")
    return 0


def controller_settings(args):
    """--hold / --dwell / --slo-floor, else the plan TOML's [controller] table (`nitsum-jax plan`
    writes it), else the engine's defaults."""
    import tomllib

    from nitsum_jax.sim.run import ControllerSettings

    table = {}
    if args.plans and args.plans.endswith(".toml"):
        with open(args.plans, "rb") as f:
            table = tomllib.load(f).get("controller", {})
    base = ControllerSettings(**table)
    given = {"hold_s": args.hold, "min_dwell_s": args.dwell, "slo_floor": args.slo_floor}
    return ControllerSettings(**{k: v if v is not None else getattr(base, k) for k, v in given.items()})


def _largest_tp(cfg, n: int) -> int:
    tp = 1
    while tp * 2 <= n and cfg.num_heads % (tp * 2) == 0:
        tp *= 2
    return tp


def _print_comparison(comparison: dict, console) -> None:
    from rich.table import Table

    from nitsum_jax.sim import baselines

    table = Table(title=f"adaptive vs the best static of each figure (urgent tier {comparison['urgent_class']!r}); "
                        f"best static's knee {comparison['knee_rps']} req/s", title_justify="left")
    for col in baselines.COLUMNS:
        table.add_column(col)
    for row in baselines.table_rows(comparison):
        table.add_row(*row)
    console.print(table)
    if not comparison["swept_past_knee"]:
        console.print("the sweep does not go past the best static's knee: add higher rates")


def run_plan(args) -> int:
    from nitsum_jax.sim.plan_command import plan_command

    return plan_command(args, load_inputs, settings_for, _largest_tp)
