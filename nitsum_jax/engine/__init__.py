"""The engine: a deterministic serving core (`core`) driven by the GPU runtime (`runtime`).

`Engine` is the runtime over real lanes; `EngineCore` makes every decision; `RequestHandle`
streams a request's tokens; `stats` holds the one implementation of the serving figures;
`api` is the contract the server, bench and notebooks use.
"""

from nitsum_jax.engine.core import EngineCore, Entry, Finished, PlanSwitch
from nitsum_jax.engine.handle import RequestHandle
from nitsum_jax.engine.runtime import Engine
from nitsum_jax.engine.turnstile import Turnstile

__all__ = ["Engine", "EngineCore", "Entry", "Finished", "PlanSwitch", "RequestHandle", "Turnstile"]
