"""Which tier an HTTP request claims, and the per-request SLO targets a gateway sends.

In order, the first present wins:
1. the body's `priority`: a tier name, or an integer rank (0 = most urgent), as vLLM and SGLang
   users send it through the openai client's `extra_body`;
2. the `x-nitsum-priority` header (a tier name, as over gRPC);
3. the gateway's `x-llm-d-inference-objective` header (or its older spelling
   `x-gateway-inference-objective`): an InferenceObjective name, mapped to a tier by the
   objective table (`--objective NAME=TIER`; a name equal to a tier's maps to it);
4. the server's default tier.
A name or rank that is no tier, or an objective the table does not know, is a 400 listing what is
known: a misrouted request is refused rather than served under a guessed tier. The tenant's
allowed tiers bound the result afterwards (403), whichever way it was claimed.
"""

from __future__ import annotations

import math
from typing import Mapping

from nitsum_jax.server.http.errors import invalid
from nitsum_jax.server.service import PRIORITY_METADATA

OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
SLO_HEADERS = {"ttft": "x-llm-d-slo-ttft-ms", "tpot": "x-llm-d-slo-tpot-ms"}


def parse_objectives(pairs: list[str], classes: Mapping) -> dict[str, str]:
    """`["realtime=high", "batch=low"]` -> {objective: tier}; ValueError naming a bad pair."""
    table: dict[str, str] = {}
    for pair in pairs:
        name, sep, tier = pair.partition("=")
        if not sep or not name.strip() or tier.strip() not in classes:
            raise ValueError(f"--objective {pair!r} must be NAME=TIER with TIER one of {sorted(classes)}")
        table[name.strip()] = tier.strip()
    return table


def _by_rank(rank: int, classes: Mapping) -> str:
    for name, cls in classes.items():
        if cls.rank == rank:
            return name
    known = ", ".join(f"{c.rank} ({n})" for n, c in sorted(classes.items(), key=lambda kv: kv[1].rank))
    raise invalid(f"priority {rank} is not a tier rank; known ranks: {known}", "priority")


def resolve_tier(body_priority: str | int | None, headers: Mapping[str, str], classes: Mapping,
                 objectives: Mapping[str, str], default: str) -> tuple[str, str]:
    """(tier, how it was claimed) for a request; raises ApiError 400 for an unknown tier or objective."""
    if isinstance(body_priority, int):
        return _by_rank(body_priority, classes), "priority"
    if body_priority is not None:
        if body_priority not in classes:
            raise invalid(f"priority {body_priority!r} is not a tier; known: {sorted(classes)} or their ranks",
                          "priority")
        return body_priority, "priority"
    named = headers.get(PRIORITY_METADATA)
    if named is not None:
        if named not in classes:
            raise invalid(f"{PRIORITY_METADATA} {named!r} is not a priority class; known: {sorted(classes)}",
                          PRIORITY_METADATA)
        return named, PRIORITY_METADATA
    for header in OBJECTIVE_HEADERS:
        objective = headers.get(header)
        if objective is None:
            continue
        tier = objectives.get(objective, objective if objective in classes else None)
        if tier is None:
            raise invalid(f"{header} {objective!r} maps to no tier; objective table: {dict(objectives)}, tiers: "
                          f"{sorted(classes)} (map it with --objective {objective}=TIER)", header)
        return tier, header
    return default, "default"


def slo_targets(headers: Mapping[str, str]) -> dict[str, float]:
    """The gateway's per-request targets in seconds, {"ttft": s, "tpot": s} for the headers present;
    400 for a value that is not a positive number of milliseconds."""
    out = {}
    for kind, header in SLO_HEADERS.items():
        text = headers.get(header)
        if text is None:
            continue
        try:
            ms = float(text)
        except ValueError:
            ms = math.nan
        if not (ms > 0 and math.isfinite(ms)):
            raise invalid(f"{header} must be a positive number of milliseconds, got {text!r}", header)
        out[kind] = ms / 1000.0
    return out
