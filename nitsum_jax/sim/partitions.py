"""Static deployments and adaptive plan-set candidates, from the partitions of the devices.

A partition cuts the devices into lanes of power-of-two TP degrees (largest first, each on
consecutive devices). The static baselines are every partition with each lane serving every
tier (`shared`, the vLLM-with-priority deployment: one priority scheduler with preemption per
lane), and every partition of two or more lanes with one lane, of each TP degree it holds, kept
for the most urgent tier and the rest shared (`dedicated`). Adaptive candidates combine, over
one partition, its shared, reserved and throughput plans for the controller to choose between.
"""

from __future__ import annotations

from nitsum_jax.plans.spec import ALL_CLASSES, LaneSpec, Plan
from nitsum_jax.scheduler.classes import PriorityClass, by_rank, urgent_names


def partitions(num_devices: int, max_tp: int | None = None) -> list[tuple[int, ...]]:
    """Every multiset of power-of-two TP degrees (<= max_tp) summing to `num_devices`, each as a
    tuple largest first, the widest lanes first: on 4 devices (4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    max_tp = max_tp or num_devices
    out: list[tuple[int, ...]] = []

    def extend(left: int, largest: int, prefix: tuple[int, ...]) -> None:
        if left == 0:
            out.append(prefix)
            return
        tp = largest
        while tp >= 1:
            if tp <= left:
                extend(left - tp, tp, prefix + (tp,))
            tp //= 2

    top = 1
    while top * 2 <= min(max_tp, num_devices):
        top *= 2
    extend(num_devices, top, ())
    return out


def partition_name(sizes: tuple[int, ...]) -> str:
    """(2, 1, 1) -> 'tp2+tp1+tp1'; (1, 1, 1, 1) -> 'tp1x4'."""
    if len(set(sizes)) == 1 and len(sizes) > 1:
        return f"tp{sizes[0]}x{len(sizes)}"
    return "+".join(f"tp{t}" for t in sizes)


def lane_devices(sizes: tuple[int, ...]) -> list[tuple[int, ...]]:
    out, start = [], 0
    for tp in sizes:
        out.append(tuple(range(start, start + tp)))
        start += tp
    return out


def _lanes(sizes: tuple[int, ...], classes_of) -> tuple[LaneSpec, ...]:
    return tuple(LaneSpec(classes_of(i), tp, devices) for i, (tp, devices) in enumerate(zip(sizes, lane_devices(sizes))))


def shared_plan(sizes: tuple[int, ...], name: str | None = None) -> Plan:
    return Plan(name or f"static-{partition_name(sizes)}", _lanes(sizes, lambda i: (ALL_CLASSES,)))


def dedicated_index(sizes: tuple[int, ...], tp: int) -> int:
    return sizes.index(tp)


def dedicated_plan(sizes: tuple[int, ...], tp: int, classes: dict[str, PriorityClass], name: str | None = None) -> Plan:
    """The first lane of degree `tp` serves only the most urgent tier; the others every tier."""
    urgent = by_rank(classes)[0].name
    k = dedicated_index(sizes, tp)
    return Plan(name or f"dedicated-tp{tp}-{partition_name(sizes)}",
                _lanes(sizes, lambda i: (urgent,) if i == k else (ALL_CLASSES,)))


def static_baselines(num_devices: int, classes: dict[str, PriorityClass], max_tp: int | None = None) -> list[Plan]:
    """Every shared partition, then every dedicated one (one plan each: run without a controller)."""
    parts = partitions(num_devices, max_tp)
    plans = [shared_plan(p) for p in parts]
    plans += [dedicated_plan(p, tp, classes) for p in parts if len(p) > 1 for tp in sorted(set(p), reverse=True)]
    return plans


def adaptive_candidates(num_devices: int, classes: dict[str, PriorityClass],
                        max_tp: int | None = None) -> list[tuple[str, tuple[Plan, ...]]]:
    """Plan sets for the controller, one per (partition of two or more lanes, TP degree of the
    lane reserved for the urgent tiers): `shared` (every lane every tier), `reserved` (that lane
    for the urgent tiers only, the others every tier) and `throughput` (that lane every tier, the
    others the bulk tiers only); plus each such set with the widest partition as its `shared`
    plan (one wide lane while the load is light)."""
    urgent = tuple(c.name for c in by_rank(classes) if c.name in urgent_names(classes))
    bulk = tuple(c.name for c in by_rank(classes) if c.name not in urgent)
    if not urgent:
        return []
    out = []
    parts = partitions(num_devices, max_tp)
    for p in parts:
        if len(p) < 2:
            continue
        for tp in sorted(set(p), reverse=True):
            k = dedicated_index(p, tp)
            reserved = Plan("reserved", _lanes(p, lambda i: urgent if i == k else (ALL_CLASSES,)))
            throughput = Plan("throughput", _lanes(p, lambda i: (ALL_CLASSES,) if i == k else bulk))
            name = f"{partition_name(p)}/reserve-tp{tp}"
            out.append((name, (shared_plan(p, "shared"), reserved, throughput)))
            if parts[0] != p:
                out.append((f"{name}/light-{partition_name(parts[0])}",
                            (shared_plan(parts[0], "shared"), reserved, throughput)))
    return out
