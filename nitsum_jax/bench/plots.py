"""Plots of a bench result. Each `plot_*` draws on a given matplotlib Axes (inline in a
notebook); `save_plots` writes the PNGs of a run with the Agg canvas (no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter

from nitsum_jax.bench.metrics import request_latencies

_STYLES = {"high": "-", "low": "--"}


def _headline_records(results: dict, config: str) -> list[dict]:
    rate_index = results["headline_rate_index"]
    return [r for r in results["requests"] if r["config"] == config and r["rate_index"] == rate_index]


def plot_latency_cdf(ax, results: dict, metric: str = "ttft") -> None:
    """Empirical CDF of `metric` ("ttft", "tpot" or "e2e") per class and configuration, at the
    headline rate; grey verticals mark each class's target (in the legend, in the class's line style)."""
    for i, config in enumerate(results["configs"]):
        records = _headline_records(results, config)
        for cls in sorted({r["priority_class"] for r in records}):
            values = np.sort([v for r in records if r["priority_class"] == cls
                              for v in [request_latencies(r)[f"{metric}_s"]] if v is not None])
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", color=f"C{i}",
                        linestyle=_STYLES.get(cls, ":"), label=f"{config} / {cls}")
    if metric in ("ttft", "tpot"):
        for cls, target in results.get("slo", {}).items():
            value = target[f"{metric}_target_s"]
            ax.axvline(value, color="grey", linestyle=_STYLES.get(cls, ":"), linewidth=1,
                       label=f"{cls} {metric.upper()} target {value:g} s")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only
    ax.set_xlabel(f"{metric.upper()} (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_rate_sweep(ax, results: dict) -> None:
    """Throughput (solid) and SLO goodput (dashed), requests/s, against the offered rate. The y axis
    starts at 0: matplotlib's auto-zoom would make a 0.4% gap between two points look large."""
    for i, (config, summary) in enumerate(results["configs"].items()):
        runs = sorted(summary["by_rate"], key=lambda run: run["rate_rps"])
        rates = [run["rate_rps"] for run in runs]
        ax.plot(rates, [run["throughput_rps"] for run in runs], "o-", color=f"C{i}", label=f"{config} throughput")
        ax.plot(rates, [run["goodput_rps"] for run in runs], "s--", color=f"C{i}", label=f"{config} goodput")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
    ax.set_title("throughput and SLO goodput against the offered rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")


def plot_plan_timeline(ax, results: dict) -> None:
    """The plan in force over the headline run of each configuration, with arrivals of each
    class as ticks under it."""
    names: list[str] = []
    for summary in results["configs"].values():
        for _, plan in summary["plan_history"] or [(0.0, "unknown")]:
            if plan not in names:
                names.append(plan)
    for i, (config, summary) in enumerate(results["configs"].items()):
        history = summary["plan_history"] or [(0.0, "unknown")]
        end = summary["span_s"]
        times = [t for t, _ in history] + [end]
        levels = [names.index(p) + 0.08 * i for _, p in history]
        ax.step(times, levels + levels[-1:], where="post", color=f"C{i}", label=config, linewidth=2)
    records = _headline_records(results, next(iter(results["configs"])))
    for j, cls in enumerate(sorted({r["priority_class"] for r in records})):
        arrivals = [r["scheduled_s"] for r in records if r["priority_class"] == cls]
        ax.plot(arrivals, np.full(len(arrivals), -0.5 - 0.25 * j), "|", markersize=6, label=f"{cls} arrivals")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("time since start of run (s)")
    ax.set_ylabel("plan")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("plan in force over the headline run")
    # Beside the axes, not on them: inside, the legend covered the plan lines.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def save_plots(results: dict, out_dir: str | Path) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    paths = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        paths.append(name)

    fig = Figure(figsize=(15, 4.5))
    for ax, metric in zip(fig.subplots(1, 3), ("ttft", "tpot", "e2e")):
        plot_latency_cdf(ax, results, metric)
    fig.suptitle(f"latency CDF at {results['headline_rate_rps']:.3g} requests/s")
    save(fig, "latency_cdf.png")
    fig = Figure(figsize=(6.5, 4.5))
    plot_rate_sweep(fig.subplots(), results)
    save(fig, "throughput_goodput_vs_rate.png")
    fig = Figure(figsize=(10, 3.5))
    plot_plan_timeline(fig.subplots(), results)
    save(fig, "plan_timeline.png")
    return paths
