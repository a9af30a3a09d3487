"""Helpers the server and engine tests share: prompts, waiting for a condition or for KV pages to
go idle, the metrics page."""

import time
import urllib.request

import numpy as np


def prompt(seed, n=8):
    """A random prompt of `n` token ids of the tiny model, starting with its BOS (256)."""
    rng = np.random.default_rng(seed)
    return [256] + [int(t) for t in rng.integers(0, 256, size=n - 1)]


def wait_for(condition, timeout=60.0, interval=0.01) -> None:
    """Poll `condition` until it holds; TimeoutError after `timeout` seconds (a wait, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


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


def tenants_toml(keys: dict[str, str]) -> str:
    """The keys file the server tests share: `gold` may claim high, low and bulk; `basic` low only;
    `metered` low at 40 tokens a minute. `keys`: tenant -> its key (only hashes are written)."""
    from nitsum_jax.server.tenants import key_sha256

    return f"""
[[tenant]]
name = "gold"
key_sha256 = "{key_sha256(keys['gold'])}"
classes = ["high", "low", "bulk"]

[[tenant]]
name = "basic"
key_sha256 = "{key_sha256(keys['basic'])}"
classes = ["low"]

[[tenant]]
name = "metered"
key_sha256 = "{key_sha256(keys['metered'])}"
classes = ["low"]
tokens_per_minute = 40
"""
