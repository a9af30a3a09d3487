"""`nitsum-jax plan`: search by simulation (`search.py`), print the expected figures beside the
best static's and why the winner wins, write the plan TOML and check that the engine loads it."""

from __future__ import annotations

import dataclasses
import sys


def plan_command(args, load_inputs, settings_for, largest_tp) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nitsum_jax.plans.spec import load_plans_toml, validate_plans
    from nitsum_jax.sim.partitions import adaptive_candidates, static_baselines
    from nitsum_jax.sim.search import best_static, explain, plan_toml, search

    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        inputs = load_inputs(args)
        classes, cfg = inputs["classes"], inputs["cfg"]
        n = args.num_devices or 4
        top = largest_tp(cfg, n)
        every = tuple({str(p): p for _, ps in adaptive_candidates(n, classes, top) for p in ps}.values())
        every += tuple(static_baselines(n, classes, top))
        settings, pages_why = settings_for(args, inputs, every)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console, disable=args.no_progress)
        with bar:
            task = bar.add_task("searching plan sets", total=None)
            found = search(inputs["model"], classes, inputs["workloads"], settings, n, top,
                           advance=lambda what: bar.update(task, advance=1, description=f"simulated {what}"),
                           on_total=lambda total: bar.update(task, total=total))
    except (ValueError, OSError) as error:
        print(f"nitsum-jax: error: {error}", file=sys.stderr)
        return 2
    best, urgent = found["best"], found["urgent"]
    static = best_static(found["statics"], urgent)
    _print_table(console, found, static, urgent)
    lines = explain(found, classes)
    for line in lines:
        console.print(line)
    rates = ", ".join(f"{w.params['rate_rps']:.3g}" for w in inputs["workloads"])
    header = [f"written by nitsum-jax plan from {args.profile} on {args.trace or 'a synthetic load'} "
              f"at {rates} req/s, {n} devices, KV pages per lane {pages_why}"] + lines
    text = plan_toml(best.config.plans, best.config.controller, header)
    with open(args.out, "w") as f:
        f.write(text)
    loaded = load_plans_toml(args.out)  # what `serve`, `bench` and `simulate` read
    validate_plans(loaded, n, cfg)
    console.print(f"wrote {args.out} ({len(loaded)} plans; controller {dataclasses.asdict(best.config.controller)})")
    return 0


def _print_table(console, found: dict, static, urgent: str) -> None:
    from rich.table import Table

    table = Table(title="expected figures (summed over rates: SLO goodput and throughput req/s; worst urgent p99)",
                  title_justify="left")
    for col in ("configuration", "goodput", "throughput", f"{urgent} TTFT p99", f"{urgent} TPOT p99"):
        table.add_column(col)
    best = found["best"]
    others = sorted(found["statics"], key=lambda s: -s.goodput)
    for label, scored in [("plan (winner): " + best.config.name, best), ("best static: " + static.config.name, static)] \
            + [(s.config.name, s) for s in others if s is not static]:
        tpot = max((r["classes"].get(urgent, {}).get("tpot_p99_s") or 0.0 for r in scored.runs), default=0.0)
        table.add_row(label, f"{scored.goodput:.2f}", f"{sum(r['throughput_rps'] for r in scored.runs):.2f}",
                      f"{scored.urgent_ttft(urgent) * 1e3:.0f} ms", f"{tpot * 1e3:.1f} ms")
    console.print(table)
