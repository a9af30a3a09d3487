"""gRPC serving (`nitsum.v1.Serving`): priority metadata, tenants and tiers, streaming, statuses,
health, reflection, Prometheus metrics, graceful drain.

Modules: `service` (the servicer: one call = one engine request), `app` (a running server:
gRPC, health, reflection, start-up and drain), `tenants` (API keys, allowed classes, token
rates), `metrics` (Prometheus), `client` (Python client), `cli` (`nitsum-jax serve|client|api-key`).
Generated code lives in `_proto` (made by setup.py at install time).
"""
