"""Which weight chunks each device holds, chosen so that lanes of different TP degrees nest.

The model is cut into C = (largest TP degree of the plan set) chunks. A lane of degree t puts
C/t chunks on each of its devices. Chunks are interchangeable (heads and ffn columns are summed
over), so each lane may pick which chunks go where: lanes are placed from the lowest TP degree
up, and each device takes the chunks it already holds first. With the usual power-of-two
plans every device ends up holding only what its largest-share lane needs.
"""

from __future__ import annotations

from nitsum_jax.config import LlamaConfig
from nitsum_jax.model import ChunkLayout
from nitsum_jax.plans.spec import Plan, PlanError


def num_chunks(plans: tuple[Plan, ...], cfg: LlamaConfig) -> int:
    c = max(lane.tp for plan in plans for lane in plan.lanes)
    for what, size in (("attention heads", cfg.num_heads), ("ffn columns", cfg.ffn_dim), ("model dim", cfg.dim)):
        if size % c:
            raise PlanError(f"the largest TP degree {c} does not divide the {size} {what}")
    return c


def assign_chunks(plans: tuple[Plan, ...], cfg: LlamaConfig) -> dict[tuple[int, ...], ChunkLayout]:
    """Lane devices -> its ChunkLayout, one per distinct lane of the plan set."""
    c = num_chunks(plans, cfg)
    lanes = {lane.devices: lane for plan in plans for lane in plan.lanes}
    held: dict[int, set[int]] = {}
    layouts = {}
    for devices, lane in sorted(lanes.items(), key=lambda kv: (kv[1].tp, kv[0])):
        per_device = c // lane.tp
        pool = set(range(c))
        rows = []
        for d in devices:
            mine = held.setdefault(d, set())
            ranked = sorted(pool, key=lambda ch: (ch not in mine, ch))
            row = tuple(sorted(ranked[:per_device]))
            pool -= set(row)
            mine.update(row)
            rows.append(row)
        layouts[devices] = ChunkLayout(c, tuple(rows))
    return layouts


def device_chunks(layouts: dict[tuple[int, ...], ChunkLayout]) -> dict[int, set[int]]:
    """Device id -> the chunks it holds (one buffer set each), over all lanes."""
    held: dict[int, set[int]] = {}
    for devices, layout in layouts.items():
        for d, row in zip(devices, layout.assign):
            held.setdefault(d, set()).update(row)
    return held
