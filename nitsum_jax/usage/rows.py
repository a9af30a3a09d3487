"""One ledger row, and how it is made from what the server holds when a request ends.

Times in a row are wall-clock epoch seconds (what a bill is stated in); the engine keeps
`time.monotonic()` seconds, turned into wall time by one offset taken when the server starts
(`wall_offset()`), so a wall-clock step (NTP) never bends a request's latencies.

Verdicts against the tier's targets are taken when the row is made and stored with the
targets they used: `ttft_met` / `tpot_met` are 1 (met), 0 (missed) or NULL (no verdict: a
request that produced at most one token has no TPOT; one that ended without a token before
its TTFT target had passed, e.g. cancelled by its client or refused, has no TTFT verdict).
`server_error` is 1 when the request ended by the server's fault (an engine error, INTERNAL,
UNAVAILABLE, HTTP 5xx): an SLA miss whatever its latencies.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from nitsum_jax.usage.schema import COLUMNS

if TYPE_CHECKING:
    from nitsum_jax.engine import RequestHandle
    from nitsum_jax.scheduler import PriorityClass

APIS = ("grpc", "http")
# gRPC codes that are the server's fault. RESOURCE_EXHAUSTED is not among them: it is also the
# answer to a tenant over its own rate, and the ledger cannot tell the two apart.
SERVER_FAULT_CODES = frozenset({"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS"})


@dataclasses.dataclass(frozen=True)
class UsageRow:
    """A finished request, as the `requests` table holds it (see the module docstring)."""

    request_id: str
    tenant: str
    tier: str
    api: str  # "grpc" | "http"
    plan: str | None  # plan and lane of the request's last step; None if it never ran
    lane: str | None
    tp: int | None
    moved: bool | None  # whether it ran on more than one lane; None if the server cannot tell
    arrival_time: float  # epoch seconds
    first_token_time: float | None
    finish_time: float
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from a prefix cache (0 without one)
    completion_tokens: int
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "deadline" | "error"; None if refused
    status: str  # gRPC status code name ("OK", "CANCELLED", ...) or HTTP status ("200", "503", ...)
    ttft_s: float | None
    tpot_s: float | None
    ttft_target_s: float | None
    tpot_target_s: float | None
    ttft_met: bool | None
    tpot_met: bool | None
    server_error: bool

    def __post_init__(self):
        if self.api not in APIS:
            raise ValueError(f"api {self.api!r} is not one of {APIS}")
        for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} is negative")
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError(f"cached_tokens {self.cached_tokens} exceeds prompt_tokens {self.prompt_tokens}")

    def values(self) -> tuple:
        """The row's values in `COLUMNS` order, booleans as SQLite integers."""
        return tuple(int(v) if isinstance(v, bool) else v for v in (getattr(self, c) for c in COLUMNS))


def wall_offset() -> float:
    """Seconds to add to a `time.monotonic()` reading to get epoch seconds (take it once, at start)."""
    return time.time() - time.monotonic()


def request_latency(arrival: float, first_token: float | None, finish: float,
                    completion_tokens: int) -> tuple[float | None, float | None]:
    """(TTFT, TPOT) in seconds: the engine's own figures (`nitsum_jax.engine.stats.latency`);
    TPOT = (finish - first token) / (n - 1) over n > 1 tokens, else None."""
    # Imported here, not at the top: `nitsum_jax.engine` loads the runtime (JAX), which the report,
    # the CLI and `load` never need; the server that makes rows has it loaded already.
    from nitsum_jax.engine.stats import latency

    figures = latency(arrival, first_token, finish, completion_tokens)
    return figures.ttft_s, figures.tpot_s


def slo_verdict(ttft_s: float | None, tpot_s: float | None, waited_s: float,
                tier: "PriorityClass") -> tuple[bool | None, bool | None]:
    """(TTFT met, TPOT met) against the tier's targets; None where there is nothing to judge.
    `waited_s`: arrival to finish, which judges a request that ended with no token at all."""
    if ttft_s is not None:
        ttft_met = ttft_s <= tier.ttft_target_s
    else:
        ttft_met = False if waited_s > tier.ttft_target_s else None
    tpot_met = None if tpot_s is None else tpot_s <= tier.tpot_target_s
    return ttft_met, tpot_met


def is_server_error(status: str | int, finish_reason: str | None) -> bool:
    """Whether the request ended by the server's fault (`SERVER_FAULT_CODES`, HTTP 5xx, engine error)."""
    status = str(status)
    return finish_reason == "error" or status in SERVER_FAULT_CODES or (status.isdigit() and int(status) >= 500)


def row_from_handle(handle: "RequestHandle", tier: "PriorityClass", *, tenant: str, api: str, status: str | int,
                    wall_offset: float, cached_tokens: int = 0) -> UsageRow:
    """The row of a request that reached the engine, from its handle once the call has ended.

    `tier`: the request's PriorityClass (`engine.classes[handle.request.priority_class]`);
    `status`: the call's final gRPC code name or HTTP status; `wall_offset`: from `wall_offset()`.
    A call that ends before the engine finished the request (a client gone, `finish_time`
    still None; the request leaves at the engine's next step) is stamped now, its finish
    reason "deadline" for a DEADLINE_EXCEEDED / 504 call, else "cancelled"."""
    request, seq = handle.request, handle.seq
    finish = handle.finish_time if handle.finish_time is not None else time.monotonic()
    reason = request.finish_reason or ("deadline" if str(status) in ("DEADLINE_EXCEEDED", "504") else "cancelled")
    n = len(seq.output_ids)
    ttft, tpot = request_latency(request.arrival, handle.first_token_time, finish, n)
    ttft_met, tpot_met = slo_verdict(ttft, tpot, finish - request.arrival, tier)
    plan, lane, tp = handle.served_by or (None, None, None)
    moves = getattr(handle, "moved", None)  # KV moves between lanes; a handle that does not say: NULL
    return UsageRow(
        request_id=request.request_id, tenant=tenant, tier=tier.name, api=api, plan=plan, lane=lane, tp=tp,
        moved=None if moves is None else moves > 0,
        arrival_time=request.arrival + wall_offset,
        first_token_time=None if handle.first_token_time is None else handle.first_token_time + wall_offset,
        finish_time=finish + wall_offset, prompt_tokens=len(seq.prompt_ids), cached_tokens=cached_tokens,
        completion_tokens=n, finish_reason=reason, status=str(status), ttft_s=ttft, tpot_s=tpot,
        ttft_target_s=tier.ttft_target_s, tpot_target_s=tier.tpot_target_s, ttft_met=ttft_met, tpot_met=tpot_met,
        server_error=is_server_error(status, reason))


def refused_row(request_id: str, tier: "PriorityClass", *, tenant: str, api: str, status: str | int,
                arrival: float, prompt_tokens: int = 0, wall_offset: float) -> UsageRow:
    """The row of a call refused before it reached the engine (queue full, rate, bad request),
    from its `time.monotonic()` arrival; it ends now."""
    finish = time.monotonic()
    ttft_met, _ = slo_verdict(None, None, finish - arrival, tier)
    return UsageRow(
        request_id=request_id, tenant=tenant, tier=tier.name, api=api, plan=None, lane=None, tp=None, moved=None,
        arrival_time=arrival + wall_offset, first_token_time=None, finish_time=finish + wall_offset,
        prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=0, finish_reason=None, status=str(status),
        ttft_s=None, tpot_s=None, ttft_target_s=tier.ttft_target_s, tpot_target_s=tier.tpot_target_s,
        ttft_met=ttft_met, tpot_met=None, server_error=is_server_error(status, None))
