"""Priority classes (tiers): name, rank (0 = most urgent), SLO targets and queue bound.

Any number of tiers, from configuration: `load_classes(path)` reads a TOML file of
`[[class]]` tables (`name`, `rank`, `ttft_s`, `tpot_s`, optional `max_queue`, `aging_s`).
Everything above this module reasons by rank and targets, never by a tier's name.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path


class ClassesError(ValueError):
    """A tier definition is malformed (the message names the file, the tier and the field)."""


@dataclasses.dataclass(frozen=True)
class PriorityClass:
    name: str
    rank: int  # lower is more urgent
    ttft_target_s: float  # time to first token
    tpot_target_s: float  # time per output token
    max_queue: int = 1024  # waiting requests beyond this are refused (RESOURCE_EXHAUSTED)
    aging_s: float = 2.0  # a waiting request gains one rank per this many seconds (no starvation)


def default_classes() -> dict[str, PriorityClass]:
    """`high` (rank 0: TTFT 0.5 s, TPOT 50 ms) and `low` (rank 1: TTFT 10 s, TPOT 0.5 s), by name."""
    return {
        "high": PriorityClass("high", rank=0, ttft_target_s=0.5, tpot_target_s=0.05),
        "low": PriorityClass("low", rank=1, ttft_target_s=10.0, tpot_target_s=0.5),
    }


def by_rank(classes: dict[str, PriorityClass]) -> list[PriorityClass]:
    """The tiers, most urgent first (ties by name, so the order is the same every time)."""
    return sorted(classes.values(), key=lambda c: (c.rank, c.name))


def urgent_names(classes: dict[str, PriorityClass]) -> set[str]:
    """Every tier more urgent than the least urgent rank: the tiers a reserved lane is for."""
    lowest = max(c.rank for c in classes.values())
    return {c.name for c in classes.values() if c.rank < lowest}


_FIELDS = {"name": str, "rank": int, "ttft_s": (int, float), "tpot_s": (int, float), "max_queue": int,
           "aging_s": (int, float)}


def _tier(entry: dict, where: str) -> PriorityClass:
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ClassesError(f"{where}: unknown field {unknown[0]!r}; accepted: {sorted(_FIELDS)}")
    for key in ("name", "rank", "ttft_s", "tpot_s"):
        if key not in entry:
            raise ClassesError(f"{where}: missing field {key!r}")
    for key, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, _FIELDS[key]):
            raise ClassesError(f"{where}: {key} = {value!r} must be a {_FIELDS[key].__name__ if isinstance(_FIELDS[key], type) else 'number'}")
    name = entry["name"]
    if not name or name == "all" or not all(ch.isalnum() or ch in "_-" for ch in name):
        raise ClassesError(f"{where}: name {name!r} must be letters, digits, '_' or '-' (and not 'all')")
    if entry["rank"] < 0:
        raise ClassesError(f"{where}: rank {entry['rank']} must be >= 0 (0 is the most urgent)")
    for key in ("ttft_s", "tpot_s", "aging_s"):
        if key in entry and not entry[key] > 0:
            raise ClassesError(f"{where}: {key} = {entry[key]} must be > 0")
    if entry.get("max_queue", 1) < 1:
        raise ClassesError(f"{where}: max_queue = {entry['max_queue']} must be >= 1")
    return PriorityClass(name, entry["rank"], float(entry["ttft_s"]), float(entry["tpot_s"]),
                         entry.get("max_queue", 1024), float(entry.get("aging_s", 2.0)))


def parse_classes(text: str, source: str = "<classes>") -> dict[str, PriorityClass]:
    """Tiers from TOML text (`[[class]]` tables); raises ClassesError naming the bad field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ClassesError(f"{source}: {e}") from None
    entries = data.get("class")
    if not isinstance(entries, list) or not entries:
        raise ClassesError(f"{source}: no [[class]] tables")
    classes: dict[str, PriorityClass] = {}
    for i, entry in enumerate(entries):
        tier = _tier(entry, f"{source}: [[class]] #{i + 1}")
        if tier.name in classes:
            raise ClassesError(f"{source}: class {tier.name!r} is defined twice")
        classes[tier.name] = tier
    return classes


def load_classes(path: str | Path) -> dict[str, PriorityClass]:
    """Tiers from a TOML file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ClassesError(f"{path}: cannot read the classes file ({e.strerror})") from None
    return parse_classes(text, str(path))
