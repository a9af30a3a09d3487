"""Plan descriptions: parse, derive defaults, validate with errors that name the bad value.

Compact form, plans separated by `;`, lanes by `,`:
    static: all=tp8@0-7; mixed: high=tp4@0-3, low=tp2@4-5, low=tp2@6-7
A lane is `CLASSES=tpN@DEVICES`; CLASSES is `all` or names joined by `+`; DEVICES is a range
`a-b` or a list `a.b.c`. TOML form: `[[plan]] name = "mixed"` with `lanes = ["high=tp4@0-3", ...]`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from pathlib import Path

from nitsum_jax.config import LlamaConfig

ALL_CLASSES = "all"


class PlanError(ValueError):
    """A plan or plan set is malformed or does not fit the model and the devices."""


@dataclasses.dataclass(frozen=True)
class LaneSpec:
    classes: tuple[str, ...]  # ("all",) serves every class
    tp: int
    devices: tuple[int, ...]

    def serves(self, priority_class: str) -> bool:
        return ALL_CLASSES in self.classes or priority_class in self.classes

    @functools.cached_property
    def name(self) -> str:
        """The lane's one identity, used by scheduler, controller, plan set, metrics and the
        server: `tp2@0-1` (`tp1@3` for one device; a list `tp2@0.2` where the devices are not
        a range)."""
        return f"tp{self.tp}@{device_text(self.devices)}"

    def __str__(self) -> str:
        return f"{'+'.join(self.classes)}={self.name}"


def device_text(devices: tuple[int, ...]) -> str:
    """`0-3` for a range, `5` for one device, `0.2` otherwise (the plan syntax's two forms)."""
    if len(devices) == 1:
        return str(devices[0])
    if devices == tuple(range(devices[0], devices[-1] + 1)):
        return f"{devices[0]}-{devices[-1]}"
    return ".".join(map(str, devices))


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    lanes: tuple[LaneSpec, ...]

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(d for lane in self.lanes for d in lane.devices)

    def __str__(self) -> str:
        return f"{self.name}: " + ", ".join(map(str, self.lanes))


_LANE = re.compile(r"^\s*([\w+\-]+)\s*=\s*tp(\d+)\s*@\s*([\d.\-]+)\s*$")


def _devices(text: str, lane: str) -> tuple[int, ...]:
    if "-" in text:
        a, _, b = text.partition("-")
        if not (a.isdigit() and b.isdigit()) or int(b) < int(a):
            raise PlanError(f"lane {lane!r}: device range {text!r} must be 'first-last' with first <= last")
        return tuple(range(int(a), int(b) + 1))
    return tuple(int(d) for d in text.split("."))


def parse_lane(text: str) -> LaneSpec:
    m = _LANE.match(text)
    if not m:
        raise PlanError(f"lane {text!r} is not CLASSES=tpN@DEVICES (e.g. high=tp4@0-3 or low=tp1@5)")
    classes = tuple(m.group(1).split("+"))
    tp, devices = int(m.group(2)), _devices(m.group(3), text)
    if len(devices) != tp:
        raise PlanError(f"lane {text!r}: tp{tp} needs {tp} devices, got {len(devices)} ({list(devices)})")
    return LaneSpec(classes, tp, devices)


def parse_plans(text: str) -> tuple[Plan, ...]:
    """Plans in the compact form (see the module docstring); syntax only, `validate_plans` checks
    them against a model and a device count. Raises PlanError naming the bad plan or lane."""
    plans = []
    for chunk in filter(str.strip, text.split(";")):
        name, sep, lanes = chunk.partition(":")
        if not sep or not name.strip():
            raise PlanError(f"plan {chunk.strip()!r} must be 'NAME: lane, lane, ...'")
        plans.append(Plan(name.strip(), tuple(parse_lane(lane) for lane in lanes.split(",") if lane.strip())))
    if not plans:
        raise PlanError("no plans given")
    return tuple(plans)


def load_plans_toml(path: Path) -> tuple[Plan, ...]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: {e}") from None
    plans = []
    for i, entry in enumerate(data.get("plan", [])):
        if "name" not in entry or "lanes" not in entry:
            raise PlanError(f"{path}: [[plan]] #{i + 1} needs 'name' and 'lanes'")
        plans.append(Plan(entry["name"], tuple(parse_lane(lane) for lane in entry["lanes"])))
    if not plans:
        raise PlanError(f"{path}: no [[plan]] tables")
    return tuple(plans)


def read_plans(value: str | None, num_devices: int, cfg: LlamaConfig,
               tiers: tuple[str, ...] = ("high", "low")) -> tuple[Plan, ...]:
    """`--plans` value: a TOML file path, the compact form, or None for the default set over
    `tiers` (class names, most urgent first)."""
    if value is None:
        plans = default_plans(num_devices, cfg, tiers)
    elif value.endswith(".toml") or Path(value).is_file():
        plans = load_plans_toml(Path(value))
    else:
        plans = parse_plans(value)
    validate_plans(plans, num_devices, cfg)
    return plans


def _largest_tp(n: int, cfg: LlamaConfig) -> int:
    tp = 1
    while tp * 2 <= n and cfg.num_heads % (tp * 2) == 0:
        tp *= 2
    return tp


def default_plans(num_devices: int, cfg: LlamaConfig, tiers: tuple[str, ...] = ("high", "low")) -> tuple[Plan, ...]:
    """`tiers`: the class names, most urgent first. static: one lane over all devices; mixed:
    the most urgent tier on the first half, every other tier on lanes of a quarter each; burst:
    lanes of a quarter each, the first serving every tier, the rest every tier but the most
    urgent (every device busy with bulk work)."""
    n = _largest_tp(num_devices, cfg)
    static = Plan("static", (LaneSpec((ALL_CLASSES,), n, tuple(range(n))),))
    if n == 1 or len(tiers) < 2:
        return (static,)
    urgent, rest = (tiers[0],), tuple(tiers[1:])
    half, quarter = n // 2, max(n // 4, 1)
    mixed = [LaneSpec(urgent, half, tuple(range(half)))]
    mixed += [LaneSpec(rest, quarter, tuple(range(d, d + quarter))) for d in range(half, n, quarter)]
    burst = [LaneSpec(urgent + rest if d == 0 else rest, quarter, tuple(range(d, d + quarter)))
             for d in range(0, n, quarter)]
    return static, Plan("mixed", tuple(mixed)), Plan("burst", tuple(burst))


def validate_plans(plans: tuple[Plan, ...], num_devices: int, cfg: LlamaConfig) -> None:
    """Raise PlanError unless names are unique and every lane has a power-of-two TP degree that
    divides the heads, and devices inside 0..num_devices-1 that no other lane of its plan uses."""
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise PlanError(f"plan names must be unique, got {names}")
    for plan in plans:
        seen: dict[int, LaneSpec] = {}
        for lane in plan.lanes:
            if lane.tp & (lane.tp - 1):
                raise PlanError(f"plan {plan.name!r}, lane {lane}: tp{lane.tp} must be a power of two")
            if cfg.num_heads % lane.tp:
                raise PlanError(f"plan {plan.name!r}, lane {lane}: tp{lane.tp} does not divide the "
                                f"{cfg.num_heads} attention heads")
            if lane.tp > cfg.num_kv_heads and lane.tp % cfg.num_kv_heads:
                raise PlanError(f"plan {plan.name!r}, lane {lane}: tp{lane.tp} above the {cfg.num_kv_heads} kv "
                                f"heads must be a multiple of them (kv heads are then replicated)")
            for d in lane.devices:
                if not 0 <= d < num_devices:
                    raise PlanError(f"plan {plan.name!r}, lane {lane}: device {d} is outside 0-{num_devices - 1}")
                if d in seen:
                    raise PlanError(f"plan {plan.name!r}: device {d} is in two lanes ({seen[d]} and {lane})")
                seen[d] = lane


def check_plan_classes(plans: tuple[Plan, ...], classes: set[str] | dict) -> list[str]:
    """Raise PlanError unless every lane names known classes (or `all`). Returns a warning for
    each plan that serves no lane for some class: while such a plan is in force, that class's
    requests wait (a class kept out of a plan on purpose, e.g. one that is only ever refused)."""
    known = set(classes)
    warnings = []
    for plan in plans:
        for lane in plan.lanes:
            unknown = [c for c in lane.classes if c != ALL_CLASSES and c not in known]
            if unknown:
                raise PlanError(f"plan {plan.name!r}, lane {lane}: unknown class {unknown[0]!r}; "
                                f"known: {sorted(known)} or {ALL_CLASSES!r}")
        stranded = [c for c in sorted(known) if not any(lane.serves(c) for lane in plan.lanes)]
        if stranded:
            warnings.append(f"plan {plan.name!r} has no lane for class(es) {stranded}: while it is in force their "
                            f"requests wait")
    return warnings
