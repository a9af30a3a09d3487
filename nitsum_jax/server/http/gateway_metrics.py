"""The model-server protocol gauges a Kubernetes inference gateway's endpoint picker reads, and
the record of the gateway's per-request SLO targets.

Gauges (read at scrape time, like the server's `EngineCollector`):
- `nitsum_num_requests_waiting`: requests in the tier queues (`engine.stats()["queue"]`);
- `nitsum_num_requests_running`: requests admitted through this server's APIs and not finished,
  less the waiting ones (the engine counts queues, not running requests; the gate holds every
  request of both APIs in flight);
- `nitsum_kv_cache_usage_perc`: KV pages used over KV pages of the current plan's healthy lanes,
  0..1 (vLLM's `kv_cache_usage_perc` convention: 1 means full).
Each has a per-tier family beside it (`..._by_tier{tier=...}`; KV usage over the lanes that
serve the tier), so a picker can be pointed at one tier's figure; the unlabelled totals are what
the picker's defaults expect.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nitsum_jax.server.engine_view import lanes_info


def _tier_lanes(lanes: list[dict], tier: str) -> set[str]:
    """The lanes of the current plan that serve `tier` (`lanes_info`'s `serves`)."""
    return {lane["name"] for lane in lanes if tier in lane.get("serves", ()) or "all" in lane.get("serves", ())}


def kv_usage(engine, lanes: list[dict], names: set[str] | None = None) -> float:
    """Used over total KV pages of the healthy lanes of the current plan (of `names` if given)."""
    chosen = [lane for lane in lanes if lane.get("in_plan", True) and lane.get("healthy", True)
              and (names is None or lane["name"] in names)]
    total = sum(lane["kv_pages_total"] for lane in chosen)
    return sum(lane["kv_pages_used"] for lane in chosen) / total if total else 0.0


class GatewayCollector(Collector):
    """`engine()`: the engine, None while it is built; `in_flight()`: the handles of requests in flight."""

    def __init__(self, engine: Callable[[], object | None], in_flight: Callable[[], list]):
        self._engine, self._in_flight = engine, in_flight

    def collect(self):
        engine = self._engine()
        if engine is None:
            return
        waiting = dict(engine.stats()["queue"])
        unfinished: dict[str, int] = {tier: 0 for tier in engine.classes}
        for handle in self._in_flight():
            if handle is not None and handle.finish_time is None:
                unfinished[handle.request.priority_class] = unfinished.get(handle.request.priority_class, 0) + 1
        running = {tier: max(0, unfinished.get(tier, 0) - waiting.get(tier, 0)) for tier in engine.classes}
        lanes = lanes_info(engine)
        yield GaugeMetricFamily("nitsum_num_requests_waiting", "Requests waiting in the tier queues",
                                value=sum(waiting.values()))
        yield GaugeMetricFamily("nitsum_num_requests_running", "Requests admitted and not finished, less the "
                                                               "waiting ones", value=sum(running.values()))
        yield GaugeMetricFamily("nitsum_kv_cache_usage_perc", "KV pages used over KV pages of the current plan's "
                                                              "healthy lanes (1 = full)", value=kv_usage(engine, lanes))
        by_tier = {name: GaugeMetricFamily(f"{name}_by_tier", f"{doc}, per tier", labels=["tier"]) for name, doc in (
            ("nitsum_num_requests_waiting", "Requests waiting"), ("nitsum_num_requests_running", "Requests running"),
            ("nitsum_kv_cache_usage_perc", "KV usage of the lanes serving the tier (1 = full)"))}
        for tier in sorted(engine.classes, key=lambda t: engine.classes[t].rank):
            by_tier["nitsum_num_requests_waiting"].add_metric([tier], waiting.get(tier, 0))
            by_tier["nitsum_num_requests_running"].add_metric([tier], running[tier])
            by_tier["nitsum_kv_cache_usage_perc"].add_metric([tier], kv_usage(engine, lanes, _tier_lanes(lanes, tier)))
        yield from by_tier.values()


class SloRecord:
    """Requests that carried a gateway SLO target stricter than their tier's, and whether they met
    it (`nitsum_request_slo`, counted per tier, target and outcome). The engine schedules by the
    tier's targets; this is what an operator checks the stricter per-request ones against."""

    def __init__(self, registry: CollectorRegistry):
        self.counter = Counter("nitsum_request_slo", "Requests with an SLO header stricter than their tier's, by "
                                                     "tier, target (ttft, tpot) and whether it was met",
                               ["tier", "target", "met"], registry=registry)

    def observe(self, engine, handle, code: str, targets: dict[str, float]) -> None:
        tier = engine.classes[handle.request.priority_class]
        stricter = {k: v for k, v in targets.items()
                    if v < (tier.ttft_target_s if k == "ttft" else tier.tpot_target_s)}
        if not stricter or code != "OK" or handle.first_token_time is None:
            return
        n = len(handle.seq.output_ids)
        measured = {"ttft": handle.first_token_time - handle.request.arrival,
                    "tpot": (handle.finish_time - handle.first_token_time) / (n - 1)
                    if n > 1 and handle.finish_time is not None else None}
        for kind, target in stricter.items():
            if measured[kind] is not None:
                self.counter.labels(tier.name, kind, "true" if measured[kind] <= target else "false").inc()
