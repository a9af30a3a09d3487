"""Prometheus metrics of a server (prometheus-client), on their own registry.

Per request (observed by the service when a request ends): TTFT, TPOT and end-to-end
histograms per class, prompt/completion tokens per tenant and class (what tiered billing
needs), requests per class and status. Engine state (read from `engine.stats()` at scrape
time by a collector): queue sizes per class, KV pages used/total per lane, plan switches,
preemptions, KV moves, the current plan, each lane's health and membership of the current plan.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nitsum_jax.server.engine_view import lanes_info

LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)


class EngineCollector(Collector):
    """Reads the engine's stats at each scrape; nothing while the engine is still being built."""

    def __init__(self, engine: Callable[[], object | None]):
        self._engine = engine

    def collect(self):
        engine = self._engine()
        if engine is None:
            return
        stats = engine.stats()
        queue = GaugeMetricFamily("nitsum_queue_size", "Requests waiting, per priority class", labels=["class"])
        for cls, n in stats["queue"].items():
            queue.add_metric([cls], n)
        used = GaugeMetricFamily("nitsum_kv_pages_used", "KV cache pages in use, per lane", labels=["lane"])
        total = GaugeMetricFamily("nitsum_kv_pages_total", "KV cache pages, per lane", labels=["lane"])
        healthy = GaugeMetricFamily("nitsum_lane_healthy", "1 while the lane's steps succeed, 0 once one failed",
                                    labels=["lane"])
        in_plan = GaugeMetricFamily("nitsum_lane_in_plan", "1 if the lane belongs to the current plan", labels=["lane"])
        for lane in lanes_info(engine):
            used.add_metric([lane["name"]], lane["kv_pages_used"])
            total.add_metric([lane["name"]], lane["kv_pages_total"])
            healthy.add_metric([lane["name"]], 1.0 if lane.get("healthy", True) else 0.0)
            in_plan.add_metric([lane["name"]], 1.0 if lane.get("in_plan", True) else 0.0)
        plan = GaugeMetricFamily("nitsum_current_plan", "1 for the plan the engine runs now", labels=["plan"])
        for name in engine.plan_set.plans:
            plan.add_metric([name], 1.0 if name == stats["plan"] else 0.0)
        yield from (queue, used, total, healthy, in_plan, plan)
        yield CounterMetricFamily("nitsum_plan_switches", "Plan switches since start", value=len(stats["plan_switches"]))
        yield CounterMetricFamily("nitsum_preemptions", "Preemptions since start", value=stats["preemptions"])
        yield CounterMetricFamily("nitsum_kv_moves", "KV page moves between lanes since start", value=stats["kv_moves"])
        busy = stats.get("device_busy_fraction")
        if isinstance(busy, (int, float)):
            yield GaugeMetricFamily("nitsum_device_busy_fraction",
                                    "Device-seconds inside steps over device-seconds elapsed", value=float(busy))


class ServerMetrics:
    def __init__(self, engine: Callable[[], object | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("nitsum_ttft_seconds", "Time to first token", ["class"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("nitsum_tpot_seconds", "Time per output token after the first", ["class"],
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("nitsum_e2e_seconds", "Request latency, arrival to last token", ["class"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nitsum_prompt_tokens", "Prompt tokens of admitted requests",
                                     ["tenant", "class"], registry=r)
        self.completion_tokens = Counter("nitsum_completion_tokens", "Tokens generated", ["tenant", "class"],
                                         registry=r)
        self.requests = Counter("nitsum_requests", "Generate calls by class and final status", ["class", "code"],
                                registry=r)
        self.in_flight = Gauge("nitsum_requests_in_flight", "Generate calls being served", registry=r)
        r.register(EngineCollector(engine))
        self._http = None

    def observe(self, priority_class: str, tenant: str, *, prompt_tokens: int, completion_tokens: int,
                ttft_s: float | None, tpot_s: float | None, e2e_s: float | None) -> None:
        self.prompt_tokens.labels(tenant, priority_class).inc(prompt_tokens)
        self.completion_tokens.labels(tenant, priority_class).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(priority_class).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(priority_class).observe(tpot_s)
        if e2e_s is not None:
            self.e2e.labels(priority_class).observe(e2e_s)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP; returns the bound port (0 picks a free one)."""
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
