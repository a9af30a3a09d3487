"""What the server reads from an engine, in one place (so the service, metrics and server info
agree), through the engine contract (`nitsum_jax.engine.api.EngineAPI`) alone: lanes with their
KV pages, the plans, and who served a request."""

from __future__ import annotations


def lanes_info(engine) -> list[dict]:
    """Every lane of the plan set: name, devices, tp, KV pages used and total, health, in plan."""
    return engine.lanes_info()


def plan_names(engine) -> list[str]:
    return list(engine.plan_names)


def served_by(engine, handle) -> tuple[str, str, int] | None:
    """(plan, lane, tp) of the request's last step."""
    return handle.served_by
