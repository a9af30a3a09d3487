"""Figures from per-request records: throughput, latency percentiles, SLO goodput."""

from __future__ import annotations

import numpy as np

from nitsum_jax.bench.backends import COMPLETED, FAILED, REJECTED
from nitsum_jax.engine import stats as figures


def _latency(record: dict) -> figures.Latency:
    return figures.latency(record["sent_s"], record["first_token_s"], record["finish_s"], record["output_tokens"],
                           record["status"] == COMPLETED)


def request_latencies(record: dict) -> dict:
    """TTFT, TPOT and end-to-end seconds of a record, measured from when it was sent; None where
    not defined (the rules of `nitsum_jax.engine.stats`)."""
    lat = _latency(record)
    return {"ttft_s": lat.ttft_s, "tpot_s": lat.tpot_s, "e2e_s": lat.e2e_s}


def meets_slo(record: dict, ttft_target_s: float, tpot_target_s: float) -> bool:
    """Completed within both targets of its class (a one-token answer has no TPOT to miss)."""
    return figures.meets_slo(_latency(record), ttft_target_s, tpot_target_s, record["status"] == COMPLETED)


_pct = figures.percentile


def _counts(records: list[dict]) -> dict:
    statuses = [r["status"] for r in records]
    return {"sent": len(records), "completed": statuses.count(COMPLETED), "rejected": statuses.count(REJECTED),
            "failed": statuses.count(FAILED)}


def summarize(records: list[dict], slo: dict[str, tuple[float, float]], wall_s: float) -> dict:
    """Throughput, goodput and latency percentiles per class and overall.

    `slo`: class -> (ttft_target_s, tpot_target_s). Rates divide by the span from the start of
    the run to the last finish (or the last send, when nothing finished later)."""
    ends = [r["finish_s"] for r in records if r["finish_s"] is not None] + [r["sent_s"] for r in records]
    span = max(ends, default=0.0) or wall_s
    span = max(span, 1e-9)
    out = {"span_s": span, "wall_s": wall_s, **_counts(records)}
    met = [r for r in records if r["priority_class"] in slo and meets_slo(r, *slo[r["priority_class"]])]
    done = [r for r in records if r["status"] == COMPLETED]
    out |= {"throughput_rps": len(done) / span,
            "output_tokens_per_s": sum(r["output_tokens"] for r in records) / span,
            "goodput_rps": len(met) / span,
            "slo_attainment": len(met) / len(records) if records else None,
            "send_lateness_max_s": max((r["sent_s"] - r["scheduled_s"] for r in records), default=0.0)}
    classes = {}
    for name in sorted({r["priority_class"] for r in records}):
        mine = [r for r in records if r["priority_class"] == name]
        lat = [request_latencies(r) for r in mine if r["status"] == COMPLETED]
        good = [r for r in mine if name in slo and meets_slo(r, *slo[name])]
        entry = {**_counts(mine), "goodput_rps": len(good) / span,
                 "throughput_rps": sum(r["status"] == COMPLETED for r in mine) / span,
                 "output_tokens_per_s": sum(r["output_tokens"] for r in mine) / span,
                 "slo_attainment": len(good) / len(mine),
                 "ttft_target_s": slo.get(name, (None, None))[0], "tpot_target_s": slo.get(name, (None, None))[1]}
        for metric in ("ttft", "tpot", "e2e"):
            values = [x[f"{metric}_s"] for x in lat if x[f"{metric}_s"] is not None]
            entry |= {f"{metric}_p50_s": _pct(values, 50), f"{metric}_p99_s": _pct(values, 99),
                      f"{metric}_mean_s": float(np.mean(values)) if values else None}
        classes[name] = entry
    out["classes"] = classes
    return out


def ratios(numerator: dict, denominator: dict) -> dict:
    """numerator / denominator of the headline figures (None where undefined)."""
    def div(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    keys = ("throughput_rps", "output_tokens_per_s", "goodput_rps", "device_busy_fraction")
    out = {k: div(numerator.get(k), denominator.get(k)) for k in keys}
    out["classes"] = {
        c: {k: div(numerator["classes"][c].get(k), denominator["classes"].get(c, {}).get(k))
            for k in ("goodput_rps", "throughput_rps", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                      "e2e_p50_s", "e2e_p99_s")}
        for c in numerator.get("classes", {}) if c in denominator.get("classes", {})}
    return out
