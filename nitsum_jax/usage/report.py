"""What a ledger says, per tenant and tier: requests, tokens, SLO attainment, misses by reason
and latency percentiles; or its rows, filtered.

A request belongs to the window it finished in (`since <= finish_time < until`): that is
when it is billed. SLO attainment is over the requests with a verdict (`judged`): those
with a TTFT or TPOT verdict or a server error; a request cancelled by its client before its
TTFT target passed, or refused as malformed, is neither met nor missed. The reasons of a
miss (TTFT, TPOT, server error) can overlap; `missed` counts each request once.
Percentiles are NumPy's (linear), as the engine's stats; e2e is over completed requests
(finish "stop" or "length") only.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3

import numpy as np

from nitsum_jax.usage.schema import open_ro

BOOLEAN_COLUMNS = ("moved", "ttft_met", "tpot_met", "server_error")
_JUDGED = "(ttft_met IS NOT NULL OR tpot_met IS NOT NULL OR server_error)"
_MISSED = "(ttft_met IS 0 OR tpot_met IS 0 OR server_error)"  # IS: NULL (no verdict) is not a miss
_SUMMARY_SQL = f"""
SELECT tenant, tier, count(*) AS requests,
       sum(prompt_tokens) AS prompt_tokens, sum(cached_tokens) AS cached_tokens,
       sum(completion_tokens) AS completion_tokens,
       sum({_JUDGED}) AS judged, sum({_MISSED}) AS missed,
       sum(ttft_met IS 0) AS missed_ttft, sum(tpot_met IS 0) AS missed_tpot, sum(server_error) AS missed_error
FROM requests WHERE {{where}} GROUP BY tenant, tier ORDER BY tenant, tier
"""
_LATENCY_SQL = """
SELECT tenant, tier, ttft_s, tpot_s,
       CASE WHEN finish_reason IN ('stop', 'length') THEN finish_time - arrival_time END AS e2e_s
FROM requests WHERE {where}
"""


def parse_time(text: str | float | int | dt.datetime) -> float:
    """Epoch seconds from epoch seconds ("1764547200.5") or ISO 8601 ("2026-12-01T09:30:00+01:00",
    "2026-12-01"); an ISO time without an offset is UTC."""
    if isinstance(text, dt.datetime):
        when = text
    elif isinstance(text, (int, float)):
        return float(text)
    else:
        try:
            return float(text)
        except ValueError:
            pass
        try:
            when = dt.datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(f"time {text!r} is neither epoch seconds (e.g. 1764547200) nor ISO 8601 "
                             f"(e.g. 2026-12-01T09:30:00Z or 2026-12-01)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def attainment(judged: int, missed: int) -> float | None:
    """The fraction of judged requests that met every target (None when none was judged)."""
    return (judged - missed) / judged if judged else None


def _where(since, until, tenant) -> tuple[str, list]:
    clauses, args = ["1"], []
    if since is not None:
        clauses.append("finish_time >= ?")
        args.append(parse_time(since))
    if until is not None:
        clauses.append("finish_time < ?")
        args.append(parse_time(until))
    if tenant is not None:
        clauses.append("tenant = ?")
        args.append(tenant)
    return " AND ".join(clauses), args


def _percentiles(values: list[float], name: str) -> dict[str, float | None]:
    return {f"{name}_{q}_s": float(np.percentile(values, p)) if values else None for q, p in (("p50", 50), ("p99", 99))}


def summarize(conn: sqlite3.Connection, since=None, until=None, tenant: str | None = None) -> list[dict]:
    """One dict per (tenant, tier), sorted: counts, token sums, `slo_attainment`, misses, p50/p99."""
    where, args = _where(since, until, tenant)
    conn.row_factory = sqlite3.Row
    groups = {(r["tenant"], r["tier"]): dict(r) for r in conn.execute(_SUMMARY_SQL.format(where=where), args)}
    latencies: dict[tuple, dict[str, list[float]]] = {k: {"ttft": [], "tpot": [], "e2e": []} for k in groups}
    for r in conn.execute(_LATENCY_SQL.format(where=where), args):
        lists = latencies[(r["tenant"], r["tier"])]
        for name in ("ttft", "tpot", "e2e"):
            if r[f"{name}_s"] is not None:
                lists[name].append(r[f"{name}_s"])
    out = []
    for key, group in groups.items():
        group["slo_attainment"] = attainment(group["judged"], group["missed"])
        for name, values in latencies[key].items():
            group.update(_percentiles(values, name))
        out.append(group)
    return out


def list_requests(conn: sqlite3.Connection, since=None, until=None, tenant: str | None = None) -> list[dict]:
    """The rows in the window, by finish time; flags as booleans (None where the ledger has none)."""
    where, args = _where(since, until, tenant)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute(f"SELECT * FROM requests WHERE {where} ORDER BY finish_time, rowid", args)]
    for row in rows:
        for name in BOOLEAN_COLUMNS:
            if row[name] is not None:
                row[name] = bool(row[name])
    return rows


def usage_report(path: str | os.PathLike, since=None, until=None, tenant: str | None = None) -> list[dict]:
    """`summarize` over the ledger at `path`, read-only (safe while a server writes it)."""
    conn = open_ro(path)
    try:
        return summarize(conn, since, until, tenant)
    finally:
        conn.close()


def load(path: str | os.PathLike, since=None, until=None, tenant: str | None = None):
    """The ledger's rows in the window as a pandas DataFrame, one row per request, columns as the
    table's (times in epoch seconds; flags as pandas' nullable booleans)."""
    import pandas as pd  # the report and the server do not need pandas; notebooks and the bench do

    where, args = _where(since, until, tenant)
    conn = open_ro(path)
    try:
        frame = pd.read_sql_query(f"SELECT * FROM requests WHERE {where} ORDER BY finish_time, rowid", conn,
                                  params=args)
    finally:
        conn.close()
    return frame.astype({name: "boolean" for name in BOOLEAN_COLUMNS})
