"""The one implementation of the serving figures: TTFT, TPOT, end-to-end latency, SLO
attainment and goodput, used by the engine's stats, the server's metrics, the bench and the
notebooks. Plain Python over times in seconds; no JAX, no clock of its own.

Rules, the same everywhere:
- TTFT = first token - arrival; end-to-end = finish - arrival.
- TPOT = mean gap between output tokens after the first, (finish - first) / (n - 1); a
  one-token answer has no TPOT (None), so it cannot miss a TPOT target.
- A request meets its tier's SLO when it completed (finish reason `stop` or `length`), its TTFT
  is within the tier's target and its TPOT (where defined) within the tier's.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

COMPLETED_REASONS = frozenset({"stop", "length"})


@dataclasses.dataclass(frozen=True)
class Latency:
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None


def latency(arrival: float, first_token: float | None, finish: float | None, output_tokens: int,
            completed: bool = True) -> Latency:
    """The request's figures from its times (one clock) and its output token count; e2e only
    for a completed request."""
    ttft = first_token - arrival if first_token is not None else None
    e2e = finish - arrival if finish is not None and completed else None
    tpot = ((finish - first_token) / (output_tokens - 1)
            if first_token is not None and finish is not None and output_tokens > 1 else None)
    return Latency(ttft, tpot, e2e)


def meets_slo(lat: Latency, ttft_target_s: float, tpot_target_s: float, completed: bool = True) -> bool:
    """Completed within both targets (a one-token answer has no TPOT to miss)."""
    return (completed and lat.ttft_s is not None and lat.ttft_s <= ttft_target_s
            and (lat.tpot_s is None or lat.tpot_s <= tpot_target_s))


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def latency_summary(latencies: Iterable[Latency]) -> dict:
    """p50 and p99 of TTFT, TPOT and e2e (None where no request defines the figure)."""
    lats = list(latencies)
    out = {}
    for key in ("ttft", "tpot", "e2e"):
        values = [v for lat in lats if (v := getattr(lat, f"{key}_s")) is not None]
        out[f"{key}_p50_s"], out[f"{key}_p99_s"] = percentile(values, 50), percentile(values, 99)
    return out


def attainment(met: list[bool]) -> float | None:
    """The fraction of requests that met their SLO (None for none)."""
    return sum(met) / len(met) if met else None


def goodput(met: int, span_s: float) -> float:
    """Requests per second that met their SLO over the span."""
    return met / max(span_s, 1e-9)
