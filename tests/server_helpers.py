"""Helpers the gRPC server tests share: prompts, waiting for KV pages to go idle, the metrics page."""

import time
import urllib.request

import numpy as np


def prompt(seed, n=8):
    """A random prompt of `n` token ids of the tiny model, starting with its BOS (256)."""
    rng = np.random.default_rng(seed)
    return [256] + [int(t) for t in rng.integers(0, 256, size=n - 1)]


def wait_pages_idle(c, timeout=60.0) -> dict[str, int]:
    """Poll GetServerInfo until no lane holds KV pages (a request leaves at a step boundary);
    returns lane -> pages used when idle or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        lanes = c.server_info()["lanes"]
        if all(lane["kv_pages_used"] == 0 for lane in lanes) or time.monotonic() > deadline:
            return {lane["name"]: lane["kv_pages_used"] for lane in lanes}
        time.sleep(0.05)


def metrics_page(server) -> str:
    """The Prometheus text exposition of a running server's metrics port."""
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
