"""What the server reads from an engine, in one place (so the service, metrics and server info
agree): lanes with their KV pages, and who served a request."""

from __future__ import annotations


def lanes_info(engine) -> list[dict]:
    """Every lane of the plan set: name, devices, tp, kv_pages_used, kv_pages_total."""
    if hasattr(engine, "lanes_info"):
        return engine.lanes_info()
    return [{"name": lane.name, "devices": [int(d) for d in lane.spec.devices], "tp": lane.spec.tp,
             "kv_pages_used": lane.allocator.num_used, "kv_pages_total": lane.allocator.num_pages}
            for lane in engine.plan_set.lanes.values()]


def served_by(engine, handle) -> tuple[str, str, int] | None:
    """(plan, lane, tp) of the request's last step."""
    value = handle.served_by
    if value is None or isinstance(value, tuple):
        return value
    tp = next((lane.spec.tp for lane in engine.plan_set.lanes.values() if lane.name == value), 0)
    return engine.plan_name, value, tp
