"""Prometheus metrics of a server (prometheus-client), on their own registry.

Per request (observed by the service when a request ends): TTFT, TPOT and end-to-end
histograms per class, prompt/completion tokens per class (and per tenant with
`tenant_labels`: tenant names are off by default, since whoever reads /metrics would learn every
tenant and its usage), requests per class and status. Engine state (an `engine.stats()` snapshot
at most once per `SNAPSHOT_S`, so a scrape flood does not contend for the engine's step lock):
queue sizes per class, KV pages used and the capacity per lane, plan switches, preemptions, KV
moves, the current plan, each lane's health and membership of the current plan.

Names follow Prometheus' rules (`promtool check metrics`): counters end in `_total`, gauges do not.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nitsum_jax.server.engine_view import lanes_info, plan_names

LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)
SNAPSHOT_S = 1.0  # engine state is at most this old on a scrape
PAGE_S = 0.1  # the rendered page is at most this old: a scrape flood renders it 10 times a second
ALL_TENANTS = "all"  # the tenant label value while tenant names are off


class EngineCollector(Collector):
    """Engine state from a snapshot of its stats, taken at most once per `snapshot_s` however
    often /metrics is scraped; nothing while the engine is still being built."""

    def __init__(self, engine: Callable[[], object | None], snapshot_s: float = SNAPSHOT_S,
                 clock: Callable[[], float] = time.monotonic):
        self._engine, self._snapshot_s, self._clock = engine, snapshot_s, clock
        self._lock = threading.Lock()
        self._snapshot: tuple[float, dict, list] | None = None  # (taken at, stats, lanes)
        self.snapshots = 0  # how many times the engine's stats were read

    def snapshot(self, engine) -> tuple[dict, list]:
        """(stats, lanes) no older than `snapshot_s`; concurrent scrapes share one read."""
        with self._lock:
            now = self._clock()
            if self._snapshot is None or now - self._snapshot[0] >= self._snapshot_s:
                self._snapshot = (now, engine.stats(), lanes_info(engine))
                self.snapshots += 1
            return self._snapshot[1], self._snapshot[2]

    def collect(self):
        engine = self._engine()
        if engine is None:
            return
        stats, lanes = self.snapshot(engine)
        queue = GaugeMetricFamily("nitsum_queue_size", "Requests waiting, per priority class", labels=["class"])
        for cls, n in stats["queue"].items():
            queue.add_metric([cls], n)
        used = GaugeMetricFamily("nitsum_kv_pages_used", "KV cache pages in use, per lane", labels=["lane"])
        total = GaugeMetricFamily("nitsum_kv_pages_capacity", "KV cache pages, per lane", labels=["lane"])
        healthy = GaugeMetricFamily("nitsum_lane_healthy", "1 while the lane's steps succeed, 0 once one failed",
                                    labels=["lane"])
        in_plan = GaugeMetricFamily("nitsum_lane_in_plan", "1 if the lane belongs to the current plan", labels=["lane"])
        for lane in lanes:
            used.add_metric([lane["name"]], lane["kv_pages_used"])
            total.add_metric([lane["name"]], lane["kv_pages_total"])
            healthy.add_metric([lane["name"]], 1.0 if lane.get("healthy", True) else 0.0)
            in_plan.add_metric([lane["name"]], 1.0 if lane.get("in_plan", True) else 0.0)
        plan = GaugeMetricFamily("nitsum_current_plan", "1 for the plan the engine runs now", labels=["plan"])
        for name in plan_names(engine):
            plan.add_metric([name], 1.0 if name == stats["plan"] else 0.0)
        yield from (queue, used, total, healthy, in_plan, plan)
        yield CounterMetricFamily("nitsum_plan_switches", "Plan switches since start", value=len(stats["plan_switches"]))
        yield CounterMetricFamily("nitsum_preemptions", "Preemptions since start", value=stats["preemptions"])
        yield CounterMetricFamily("nitsum_kv_moves", "KV page moves between lanes since start", value=stats["kv_moves"])
        busy = stats.get("device_busy_fraction")
        if isinstance(busy, (int, float)):
            yield GaugeMetricFamily("nitsum_device_busy_fraction",
                                    "Device-seconds inside steps over device-seconds elapsed", value=float(busy))


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a client that stalls mid-request cannot hold the (single) serving thread longer

    def log_message(self, *args) -> None:  # no line per scrape on stderr
        pass


class MetricsPage:
    """/metrics as a WSGI app: the page rendered at most once per `max_age_s` and served from one
    thread, so a scrape flood costs one renderer and one socket at a time, not one thread each."""

    def __init__(self, registry: CollectorRegistry, max_age_s: float = PAGE_S):
        self.registry, self.max_age_s = registry, max_age_s
        self._page, self._at = b"", float("-inf")
        self.renders = 0

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics only\n"]
        now = time.monotonic()
        if now - self._at >= self.max_age_s:
            self._page, self._at = generate_latest(self.registry), now
            self.renders += 1
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [self._page]


class ServerMetrics:
    def __init__(self, engine: Callable[[], object | None], *, tenant_labels: bool = False):
        self.tenant_labels = tenant_labels
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
        self.engine_collector = EngineCollector(engine)
        r.register(self.engine_collector)
        self._http = None

    def observe(self, priority_class: str, tenant: str, *, prompt_tokens: int, completion_tokens: int,
                ttft_s: float | None, tpot_s: float | None, e2e_s: float | None) -> None:
        tenant = tenant if self.tenant_labels else ALL_TENANTS
        self.prompt_tokens.labels(tenant, priority_class).inc(prompt_tokens)
        self.completion_tokens.labels(tenant, priority_class).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(priority_class).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(priority_class).observe(tpot_s)
        if e2e_s is not None:
            self.e2e.labels(priority_class).observe(e2e_s)

    def serve(self, port: int, addr: str) -> int:
        """Serve /metrics over HTTP on `addr`; returns the bound port (0 picks a free one)."""
        class Server(WSGIServer):
            address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

        self.page = MetricsPage(self.registry)
        self._http = make_server(addr, port, self.page, server_class=Server, handler_class=_QuietHandler)
        threading.Thread(target=self._http.serve_forever, name="nitsum-metrics", daemon=True).start()
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
