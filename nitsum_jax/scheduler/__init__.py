"""Scheduling: priority classes, queues, admission by KV pages, preemption. No JAX here."""

from nitsum_jax.scheduler.classes import PriorityClass, by_rank, default_classes, load_classes
from nitsum_jax.scheduler.core import Scheduler
from nitsum_jax.scheduler.requests import CostModel, LaneQueue, Move, QueueFull, Request, State, SwitchPlan, Work

__all__ = ["CostModel", "LaneQueue", "Move", "PriorityClass", "QueueFull", "Request", "Scheduler", "State",
           "SwitchPlan", "Work", "by_rank", "default_classes", "load_classes"]
