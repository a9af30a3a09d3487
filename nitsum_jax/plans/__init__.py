"""Parallelism plans: lanes on sub-meshes, compiled ahead of time, sharing weight buffers."""

from nitsum_jax.plans.lane import BucketGrid, Lane, ShapeOutsideGrid
from nitsum_jax.plans.plan_set import PlanSet
from nitsum_jax.plans.spec import LaneSpec, Plan, PlanError, default_plans, parse_plans, read_plans

__all__ = ["BucketGrid", "Lane", "LaneSpec", "Plan", "PlanError", "PlanSet", "ShapeOutsideGrid", "default_plans",
           "parse_plans", "read_plans"]
