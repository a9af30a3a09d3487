"""nitsum-jax: serve Llama-family LLMs on JAX/XLA with priority lanes.

The public API, for scripts and notebooks::

    import nitsum_jax as nj

    nj.use_host_devices(8)              # a CPU-only machine: 8 host devices (before JAX is imported)
    engine = nj.Engine.build(preset="tiny", plans="static: all=tp8@0-7; mixed: high=tp4@0-3, low=tp4@4-7",
                             adaptive=True, grid=nj.BucketGrid(decode_batch=(8,), prefill_len=(16,), max_seq_len=64),
                             num_pages=32, page_size=8)
    handle = engine.submit("Hello", nj.SamplingParams(max_tokens=8), priority_class="high")
    print(handle.result().text, engine.stats()["classes"])
    engine.close()

    results = nj.run_bench(num_requests=40, plans=..., grid=..., progress=False)   # plain dicts
    frames = nj.to_frames(results)                                                 # pandas DataFrames

Importing this package does not import JAX: each name below is loaded on first use (module
`__getattr__`), so `use_host_devices` and the CLI can still set XLA_FLAGS first.

Engine and requests: `Engine`, `RequestHandle`, `Completion`, `SamplingParams`, `SamplingError`,
`PriorityClass`, `default_classes`.
Plans: `BucketGrid`, `Plan`, `LaneSpec`, `PlanError`, `PlanSet`, `ShapeOutsideGrid`, `parse_plans`,
`read_plans`, `default_plans`, `validate_plans`, `plan_memory`.
Model config: `LlamaConfig`, `ConfigError`, `preset`.
Bench: `run_bench`, `to_frames`, `poisson_workload`, `load_trace`, `Workload`, `BenchRequest`,
`plot_latency_cdf`, `plot_plan_timeline`, `plot_rate_sweep`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import TYPE_CHECKING, Any

# public name -> module that defines it (imported on first access)
_LAZY = {
    "Engine": "nitsum_jax.engine",
    "RequestHandle": "nitsum_jax.engine",
    "Completion": "nitsum_jax.sequence",
    "SamplingParams": "nitsum_jax.sampling",
    "SamplingError": "nitsum_jax.sampling",
    "PriorityClass": "nitsum_jax.scheduler",
    "default_classes": "nitsum_jax.scheduler",
    "BucketGrid": "nitsum_jax.plans",
    "Plan": "nitsum_jax.plans",
    "LaneSpec": "nitsum_jax.plans",
    "PlanError": "nitsum_jax.plans",
    "PlanSet": "nitsum_jax.plans",
    "ShapeOutsideGrid": "nitsum_jax.plans",
    "parse_plans": "nitsum_jax.plans",
    "read_plans": "nitsum_jax.plans",
    "default_plans": "nitsum_jax.plans",
    "validate_plans": "nitsum_jax.plans.spec",
    "LlamaConfig": "nitsum_jax.config",
    "ConfigError": "nitsum_jax.config",
    "preset": "nitsum_jax.config",
    "run_bench": "nitsum_jax.bench",
    "to_frames": "nitsum_jax.bench",
    "poisson_workload": "nitsum_jax.bench",
    "load_trace": "nitsum_jax.bench",
    "Workload": "nitsum_jax.bench",
    "BenchRequest": "nitsum_jax.bench",
    "plot_latency_cdf": "nitsum_jax.bench",
    "plot_plan_timeline": "nitsum_jax.bench",
    "plot_rate_sweep": "nitsum_jax.bench",
}

__all__ = sorted([*_LAZY, "plan_memory", "use_host_devices"])

if TYPE_CHECKING:  # for editors and type checkers; at run time the names load lazily
    from nitsum_jax.bench import (BenchRequest, Workload, load_trace, plot_latency_cdf, plot_plan_timeline,
                                  plot_rate_sweep, poisson_workload, run_bench, to_frames)
    from nitsum_jax.config import ConfigError, LlamaConfig, preset
    from nitsum_jax.engine import Engine, RequestHandle
    from nitsum_jax.plans import (BucketGrid, LaneSpec, Plan, PlanError, PlanSet, ShapeOutsideGrid, default_plans,
                                  parse_plans, read_plans)
    from nitsum_jax.plans.spec import validate_plans
    from nitsum_jax.sampling_params import SamplingError, SamplingParams
    from nitsum_jax.scheduler import PriorityClass, default_classes
    from nitsum_jax.sequence import Completion


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nitsum_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return list(__all__)


_HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def use_host_devices(n: int) -> None:
    """Give a CPU-only machine `n` JAX devices (host devices): call it before JAX is imported.

    Sets `--xla_force_host_platform_device_count=n` in XLA_FLAGS (replacing a count already
    there); on a machine with accelerators the flag only affects the CPU platform and is harmless.
    If JAX is already imported, the flag may come too late: the device count is then checked and a
    `RuntimeError` says how to fix it when fewer than `n` devices are visible.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"use_host_devices: n must be an integer >= 1, got {n!r}")
    flags = re.sub(rf"\s*{_HOST_DEVICES_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} {_HOST_DEVICES_FLAG}={n}".strip()
    if "jax" in sys.modules:
        import jax

        count = jax.device_count()
        if count < n:
            raise RuntimeError(
                f"use_host_devices({n}): JAX was imported before the host device count was set and sees "
                f"{count} device(s) ({jax.default_backend()}); call nitsum_jax.use_host_devices({n}) before anything "
                f"imports JAX (restart the notebook kernel and make it the first cell), or start Python with "
                f"XLA_FLAGS={_HOST_DEVICES_FLAG}={n}")


def plan_memory(cfg: "LlamaConfig | str", plans: "tuple[Plan, ...] | str | None", num_devices: int, *,
                num_pages: int = 4096, page_size: int = 16, max_batch: int = 64, max_prefill: int = 512,
                device_memory_gib: float | None = None, weights: str = "bf16") -> dict:
    """Per-device memory of a plan set, from shapes only (no weights allocated, nothing compiled):
    the report `nitsum-jax plans` prints.

    cfg: a `LlamaConfig` or a preset name ("llama-3.1-8b", ...). plans: a tuple of `Plan`, the
    compact form, a TOML path, or None for `default_plans(num_devices, cfg)`; it is validated
    (`PlanError` on a bad plan). num_pages, page_size: the KV pages of every lane; max_batch,
    max_prefill: the largest decode batch and prefill chunk (the workspace estimate).
    device_memory_gib: raise `PlanError` unless every device fits it. weights: "bf16" or "fp8"
    (the linear weights at one byte a value plus their scales, `nitsum_jax.quant`).

    Returns a dict: `plans` (the `Plan` tuple), `num_chunks`, `chunk_bytes`, `devices` (device ->
    `weights`, `kv`, `workspace`, `total` bytes), `plan_set_weights_total`,
    `largest_plan_weights_total`, `weight_overhead` (plan-set weights over its largest plan's) and
    per-plan `weights_per_device` under `per_plan`.
    """
    from nitsum_jax.config import preset as preset_config
    from nitsum_jax.plans.layout import assign_chunks
    from nitsum_jax.plans.memory import MemoryBudget, check_fits, memory_report
    from nitsum_jax.plans.spec import read_plans, validate_plans

    if isinstance(cfg, str):
        cfg = preset_config(cfg)
    if plans is None or isinstance(plans, str):
        plans = read_plans(plans, num_devices, cfg)
    else:
        plans = tuple(plans)
        validate_plans(plans, num_devices, cfg)
    report = memory_report(cfg, plans, assign_chunks(plans, cfg),
                           MemoryBudget(num_pages, page_size, max_batch, max_prefill), weights)
    if device_memory_gib is not None:
        check_fits(report, int(device_memory_gib * 2**30))
    report["per_plan"] = report.pop("plans")
    return {"plans": plans, **report}
