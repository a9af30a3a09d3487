"""The OpenAI-compatible HTTP API (docs/http.md), beside gRPC on the same engine.

Modules: `schemas` (request bodies), `priority` (which tier a request claims; the gateway's
objective and SLO headers), `admission` (body -> engine request, the gRPC path's checks),
`respond` (JSON or server-sent events, cancel on disconnect), `shapes` (OpenAI response and
chunk bodies), `errors` (OpenAI error JSON and statuses), `gateway_metrics` (the gauges an
inference gateway's endpoint picker reads), `routes` (the FastAPI app), `server` (uvicorn on a
thread, `start_http`), `flags` (the `nitsum-jax serve` flags; no heavy imports).
"""
