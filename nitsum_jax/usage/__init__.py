"""The usage ledger: one durable SQLite row per finished request, for tiered billing and SLA credits.

    ledger = UsageLedger("usage.db")                  # 0600, WAL, schema migrated on open
    ledger.record(row_from_handle(handle, engine.classes[tier], tenant="acme", api="grpc",
                                  status="OK", wall_offset=ledger.wall_offset))   # never blocks
    ledger.close()                                     # writes what is queued
    usage_report("usage.db", since="2026-12-01")       # per tenant and tier (also `nitsum-jax usage`)
    load("usage.db")                                   # a pandas DataFrame of the rows

Modules: `schema` (the table, versions, opening), `rows` (a row and how it is made), `ledger`
(the writer), `report` (figures per tenant and tier), `cli` (`nitsum-jax usage`).
"""

from nitsum_jax.usage.ledger import UsageLedger
from nitsum_jax.usage.report import attainment, list_requests, load, parse_time, summarize, usage_report
from nitsum_jax.usage.rows import (UsageRow, is_server_error, refused_row, request_latency, row_from_handle,
                                   slo_verdict, wall_offset)
from nitsum_jax.usage.schema import SCHEMA_VERSION, LedgerError, open_ro, open_rw

__all__ = ["LedgerError", "SCHEMA_VERSION", "UsageLedger", "UsageRow", "attainment", "is_server_error",
           "list_requests", "load", "open_ro", "open_rw", "parse_time", "refused_row", "request_latency",
           "row_from_handle", "slo_verdict", "summarize", "usage_report", "wall_offset"]
