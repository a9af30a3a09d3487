"""The engine: a deterministic serving core (`core`) driven by the GPU runtime (`runtime`).

`Engine` is the runtime over real lanes; `EngineCore` makes every decision; `RequestHandle`
streams a request's tokens; `stats` holds the one implementation of the serving figures;
`api` is the contract the server, bench and notebooks use. Names load on first use, so
`nitsum_jax.engine.stats` (and the CLI's parsers) do not import JAX.
"""

import importlib

_WHERE = {"Engine": "runtime", "EngineCore": "core", "Entry": "core", "Finished": "core", "PlanSwitch": "core",
          "RequestHandle": "handle", "Turnstile": "turnstile"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"nitsum_jax.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'nitsum_jax.engine' has no attribute {name!r}")
