"""Benchmarks: drive an engine (or a server) with a workload; throughput, latency, SLO goodput.

    from nitsum_jax.bench import run_bench, to_frames, plot_latency_cdf
    results = run_bench(rates=[8, 16], duration_s=10, out_dir="bench-out")
    frames = to_frames(results)                       # pandas DataFrames
    plot_latency_cdf(ax, results, "ttft")             # on any matplotlib Axes

JAX is imported only when a bench runs (the CLI sets host devices first).
"""

from nitsum_jax.bench.api import CONFIGS, default_grid, make_workloads, run_bench, to_frames, write_outputs
from nitsum_jax.bench.backends import Backend, EngineBackend, GrpcBackend
from nitsum_jax.bench.metrics import meets_slo, ratios, request_latencies, summarize
from nitsum_jax.bench.plots import plot_latency_cdf, plot_plan_timeline, plot_rate_sweep, save_plots
from nitsum_jax.bench.runner import run_workload
from nitsum_jax.bench.workload import BenchRequest, LengthDist, Workload, load_trace, poisson_workload

__all__ = ["CONFIGS", "Backend", "BenchRequest", "EngineBackend", "GrpcBackend", "LengthDist", "Workload",
           "default_grid", "load_trace", "make_workloads", "meets_slo", "plot_latency_cdf", "plot_plan_timeline",
           "plot_rate_sweep", "poisson_workload", "ratios", "request_latencies", "run_bench", "run_workload",
           "save_plots", "summarize", "to_frames", "write_outputs"]
