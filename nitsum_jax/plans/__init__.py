"""Parallelism plans: lanes on sub-meshes, compiled ahead of time, sharing weight buffers.

Names load on first use: the plan syntax (`spec`) imports no JAX, so the engine core, the
scheduler and the simulator read plans without it; `Lane` and `PlanSet` bring JAX in.
"""

import importlib

_WHERE = {"BucketGrid": "lane", "Lane": "lane", "ShapeOutsideGrid": "lane", "PlanSet": "plan_set",
          "LaneSpec": "spec", "Plan": "spec", "PlanError": "spec", "default_plans": "spec", "parse_plans": "spec",
          "read_plans": "spec"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"nitsum_jax.plans.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'nitsum_jax.plans' has no attribute {name!r}")
