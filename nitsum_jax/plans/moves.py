"""Routes for KV moves between lanes: which pages go from which device to which, packed so
that each (source device, destination device) pair makes ONE transfer.

A lane's KV is one array per chunk slot, sharded over its devices on the kv-head axis, so a
device holds the K/V heads of the chunks in its slots. Moving a sequence to another lane means
sending each chunk's heads from the device that holds the chunk on the source lane to the
device that holds it on the destination lane. Sending every (chunk, K or V) piece on its own
costs a transfer set-up each (16-32 of them for TP4 <-> TP2); packing all pieces that share a
device pair into one buffer leaves at most max(tp_src, tp_dst) large transfers, which is what
NVLink moves near its bandwidth. The packing happens inside the gather program that already
copies the pages out of the cache, and the unpacking inside the scatter program, so no pass
over the data is added.

A route exists when the packing is the same on every device (true of the nested chunk layouts
`layout.assign_chunks` makes for power-of-two plans); otherwise moves fall back to one transfer
per piece.
"""

from __future__ import annotations

import dataclasses

from nitsum_jax.model import ChunkLayout


@dataclasses.dataclass(frozen=True)
class MoveRoute:
    # Source slots packed into transfer buffer t, the same on every source device.
    groups: tuple[tuple[int, ...], ...]
    # (buffer t, source device index, destination device index): one transfer each.
    transfers: tuple[tuple[int, int, int], ...]
    # Per destination device index: its incoming (t, source index), in the order u the
    # scatter program takes them.
    sources: tuple[tuple[tuple[int, int], ...], ...]
    # Destination slot r <- (incoming buffer u, position in that buffer), the same on every device.
    placement: tuple[tuple[int, int], ...]

    @property
    def per_buffer(self) -> int:
        return len(self.groups[0])


def plan_route(src: ChunkLayout, dst: ChunkLayout) -> MoveRoute | None:
    """The packed route from a lane of layout `src` to one of layout `dst`, or None."""
    dest_of = {c: j for j, row in enumerate(dst.assign) for c in row}
    per_src = []
    for row in src.assign:
        by_dest: dict[int, list[int]] = {}
        for r, c in enumerate(row):
            by_dest.setdefault(dest_of[c], []).append(r)
        per_src.append(by_dest)
    shapes = {tuple(sorted(tuple(g) for g in by_dest.values())) for by_dest in per_src}
    if len(shapes) != 1:
        return None
    groups = shapes.pop()
    if len({len(g) for g in groups}) != 1:
        return None
    transfers = tuple((groups.index(tuple(slots)), i, j)
                      for i, by_dest in enumerate(per_src) for j, slots in sorted(by_dest.items()))
    where = {c: (i, r) for i, row in enumerate(src.assign) for r, c in enumerate(row)}
    sources, placements = [], set()
    for j, row in enumerate(dst.assign):
        incoming: list[tuple[int, int]] = []
        placement = []
        for c in row:
            i, r = where[c]
            t = next(k for k, g in enumerate(groups) if r in g)
            if (t, i) not in incoming:
                incoming.append((t, i))
            placement.append((incoming.index((t, i)), groups[t].index(r)))
        sources.append(tuple(incoming))
        placements.add(tuple(placement))
    if len(placements) != 1 or len({len(s) for s in sources}) != 1:
        return None
    return MoveRoute(groups, transfers, tuple(sources), placements.pop())
