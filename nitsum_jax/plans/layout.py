"""Which weight chunks each device holds, chosen so that lanes of different TP degrees nest.

The model is cut into C = (largest TP degree of the plan set) chunks. A lane of degree t puts
C/t chunks on each of its devices. Chunks are interchangeable (heads and ffn columns are summed
over), so each lane may pick which chunks go where: lanes are placed from the lowest TP degree
up, and each device takes first the chunks of its last (smallest) set, then the others it
holds. With the usual power-of-two plans every device ends up holding only what its
largest-share lane needs, and its lanes' chunk sets nest, so one buffer per weight serves them
all (`weight_runs`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
    smallest: dict[int, set[int]] = {}  # a device's last (smallest) chunk set: the next one nests in it
    layouts = {}
    for devices, lane in sorted(lanes.items(), key=lambda kv: (kv[1].tp, kv[0])):
        per_device = c // lane.tp
        pool = set(range(c))
        rows = []
        for d in devices:
            mine = held.setdefault(d, set())
            inner = smallest.get(d, set(range(c)))
            ranked = sorted(pool, key=lambda ch: (ch not in inner, ch not in mine, ch))
            row = tuple(sorted(ranked[:per_device]))
            pool -= set(row)
            mine.update(row)
            smallest[d] = set(row)
            rows.append(row)
        layouts[devices] = ChunkLayout(c, tuple(rows))
    return layouts


@dataclasses.dataclass(frozen=True)
class WeightRuns:
    """How a plan set's layer weights sit in device buffers: `runs[d]` lists device d's buffers,
    each a run of chunks stored as one buffer per weight (`model.LayerGroup`); `lanes[devices]`
    gives, for each of that lane's layer groups in position order, the run it reads on each of
    its devices and how many of the run's first chunks it uses. `layouts` are the lanes' chunk
    layouts with each device's chunks in that order.

    A device's lanes usually hold nested chunk sets (`assign_chunks`): then the device keeps ONE
    run, ordered so that every lane's chunks are a prefix of it, and each lane, a TP1 lane that
    holds all chunks included, reads each weight with one gemm. A lane's group must have the same
    shape on all its devices (one global array), so runs are cut where the lane's devices differ;
    where a device's chunk sets do not nest, each of its chunks is a run of its own."""

    runs: dict[int, tuple[tuple[int, ...], ...]]
    lanes: dict[tuple[int, ...], tuple[tuple[tuple[int, ...], int], ...]]  # groups: (run per device, used)
    layouts: dict[tuple[int, ...], ChunkLayout]


def weight_runs(layouts: dict[tuple[int, ...], ChunkLayout]) -> WeightRuns:
    sets: dict[int, list[frozenset[int]]] = {}
    for devices, layout in layouts.items():
        for d, row in zip(devices, layout.assign):
            sets.setdefault(d, []).append(frozenset(row))
    order: dict[int, list[int] | None] = {}  # a device's chunk order, every lane set a prefix; None: no such order
    for d, ss in sets.items():
        chain = sorted(set(ss), key=len)
        if all(a <= b for a, b in zip(chain, chain[1:])):
            seq, seen = [], set()
            for s in chain:
                seq += sorted(s - seen)
                seen |= s
            order[d] = seq
        else:
            order[d] = None
    held = {d: sorted(frozenset().union(*ss)) for d, ss in sets.items()}
    # cuts[d]: positions in order[d] where a run starts (0 always); single chunks where no order exists
    cuts = {d: ({0} if order[d] is not None else set(range(len(held[d])))) for d in sets}
    seq = {d: order[d] if order[d] is not None else held[d] for d in sets}

    def rows(devices, layout):  # each device's chunks of the lane in run order
        return [sorted(row, key=seq[d].index) for d, row in zip(devices, layout.assign)]

    def groups(devices, layout):  # per device: [run index, run length, first chunk used, chunks used]
        out = []
        for d, row in zip(devices, rows(devices, layout)):
            starts = sorted(cuts[d])
            ends = starts[1:] + [len(seq[d])]
            per, prev = [], None
            for c in row:
                p = seq[d].index(c)
                k = max(i for i, a in enumerate(starts) if a <= p)
                if per and per[-1][0] == k and prev == p - 1:
                    per[-1][3] += 1
                else:
                    per.append([k, ends[k] - starts[k], p - starts[k], 1])
                prev = p
            out.append(per)
        return out

    def cut(d, positions) -> bool:
        new = {p for p in positions if 0 < p < len(seq[d])} - cuts[d]
        cuts[d] |= new
        return bool(new)

    changed = True
    while changed:
        changed = False
        for devices, layout in layouts.items():
            per = groups(devices, layout)
            shapes = {tuple((n, o, u) for _, n, o, u in g) for g in per}
            if len(shapes) == 1 and all(o == 0 for _, _, o, _ in per[0]):
                continue
            # Cut each device at every group boundary any device of the lane has, and after the
            # lane's chunks; if that changes nothing, into single chunks over the lane's chunks.
            bounds = set()
            for g in per:
                bounds |= set(np.cumsum([0] + [u for *_, u in g]).tolist())
            ordered = rows(devices, layout)
            if not any([cut(d, {seq[d].index(r[0]) + b for b in bounds}) for d, r in zip(devices, ordered)]):
                if not any([cut(d, {seq[d].index(c) + e for c in r for e in (0, 1)}) for d, r in zip(devices, ordered)]):
                    raise PlanError(f"no weight-buffer layout for lane {devices} ({layout.assign})")
            changed = True
    runs = {d: tuple(tuple(seq[d][a:b]) for a, b in zip(sorted(cuts[d]), sorted(cuts[d])[1:] + [len(seq[d])]))
            for d in sets}
    lanes, new_layouts = {}, {}
    for devices, layout in layouts.items():
        ordered = rows(devices, layout)
        per = groups(devices, layout)
        lanes[devices] = tuple((tuple(g[k][0] for g in per), per[0][k][3]) for k in range(len(per[0])))
        new_layouts[devices] = ChunkLayout(layout.num_chunks, tuple(tuple(r) for r in ordered))
    return WeightRuns(runs, lanes, new_layouts)
