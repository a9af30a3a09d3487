"""Drive a backend in real time: send each request at its arrival offset, collect outcomes."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from nitsum_jax.bench.backends import FAILED, Backend, make_record
from nitsum_jax.bench.workload import Workload
from nitsum_jax.settings import Settings


def run_workload(backend: Backend, workload: Workload, *, drain_timeout_s: float = 120.0, poll_s: float = 0.01,
                 on_finished: Callable[[int], None] | None = None) -> dict:
    """Send `workload` to `backend` on schedule and wait for every request (at most
    `drain_timeout_s` after the last arrival; stragglers are recorded as failed).
    Returns {"records": one dict per request in workload order, "wall_s", "backend": window stats}."""
    requests = workload.requests
    backend.begin()
    t0 = time.monotonic()
    profiler = _profile_window(backend.name)
    pending: dict[str, object] = {}
    records: dict[str, dict] = {}
    sent = 0
    give_up = None
    while sent < len(requests) or pending:
        now = time.monotonic() - t0
        while sent < len(requests) and requests[sent].arrival_s <= now:
            request = requests[sent]
            pending[request.request_id] = (request, backend.submit(request, t0))
            sent += 1
        for request_id, (request, handle) in list(pending.items()):
            record = handle.poll()
            if record is not None:
                records[request_id] = record
                del pending[request_id]
                if on_finished:
                    on_finished(1)
        if sent == len(requests):
            give_up = give_up or time.monotonic() + drain_timeout_s
            if time.monotonic() > give_up:
                for request_id, (request, _) in pending.items():
                    records[request_id] = make_record(request, t0, sent=t0 + request.arrival_s, first_token=None,
                                                      finish=None, output_tokens=0, status=FAILED,
                                                      error=f"no result {drain_timeout_s:g}s after the last arrival")
                    if on_finished:
                        on_finished(1)
                pending.clear()
                break
        next_arrival = requests[sent].arrival_s - (time.monotonic() - t0) if sent < len(requests) else poll_s
        time.sleep(max(0.0, min(poll_s, next_arrival)))
    wall_s = time.monotonic() - t0
    if profiler is not None:
        profiler.finish()
    return {"records": [records[r.request_id] for r in requests], "wall_s": wall_s,
            "backend": backend.window_stats()}


class _ProfileWindow:
    """A `jax.profiler` trace of seconds [start, start + length) of a run, for finding where a
    serving step's time goes (bench/trace_summary.py reads it). NITSUM_BENCH_PROFILE=DIR[:START:SECONDS]
    (default 5:2); each run of a config writes DIR/<config>-<n>. Diagnostics only: tracing slows
    the host, so numbers from a profiled run are not benchmark figures."""

    def __init__(self, out_dir: str, start_s: float, length_s: float):
        self.out_dir, self.length_s = out_dir, length_s
        self._lock = threading.Lock()
        self._state = "waiting"
        self._timer = threading.Timer(start_s, self._start)
        self._timer.daemon = True
        self._timer.start()

    def _start(self):
        import jax

        with self._lock:
            if self._state != "waiting":
                return
            jax.profiler.start_trace(self.out_dir)
            self._state = "tracing"
        self._timer = threading.Timer(self.length_s, self.finish)
        self._timer.daemon = True
        self._timer.start()

    def finish(self):
        import jax

        self._timer.cancel()
        with self._lock:
            if self._state == "tracing":
                jax.profiler.stop_trace()
            self._state = "done"


_profiled: dict[str, int] = {}


def _profile_window(config: str) -> _ProfileWindow | None:
    # Read as each run starts, not from the process's settings: a run is the benchmark's own
    # start-up, and a notebook may profile one run of several.
    window = Settings.from_env().bench_profile
    if window is None:
        return None
    n = _profiled[config] = _profiled.get(config, 0) + 1
    return _ProfileWindow(os.path.join(window.out_dir, f"{config}-{n}"), window.start_s, window.length_s)
