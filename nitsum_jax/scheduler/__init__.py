"""Scheduling: priority classes, queues, admission by KV pages, preemption. No JAX here."""

from nitsum_jax.scheduler.classes import PriorityClass, default_classes
from nitsum_jax.scheduler.core import CostModel, LaneQueue, QueueFull, Request, Scheduler, State, Work

__all__ = ["CostModel", "LaneQueue", "PriorityClass", "QueueFull", "Request", "Scheduler", "State", "Work", "default_classes"]
