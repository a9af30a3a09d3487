"""Routes for KV moves between lanes: which pages go from which device to which, packed so
that each (source device, destination device) pair makes ONE transfer.

A lane's K and V are each one array [positions, layers, kv heads, pages, S, H], sharded over its
devices on the kv-head axis, so a device holds the K/V heads of the chunks at its positions.
Which chunk sits at which position differs from device to device (a device orders its chunks
so that every lane on it reads a prefix of one weight buffer: `layout.weight_runs`). Moving a
sequence to another lane means sending each chunk's heads from the device that holds it on the
source lane to the device that holds it on the destination lane. Sending every (chunk, K or V)
piece on its own costs a transfer set-up each (16-32 of them for TP4 <-> TP2); packing all
pieces that share a device pair into one buffer leaves at most max(tp_src, tp_dst) large
transfers, which is what NVLink moves near its bandwidth. The packing happens inside the gather
program that already copies the pages out of the cache, and the unpacking inside the scatter
program, so no pass over the data is added.

The programs are SPMD, one per lane: every device packs the same number of buffers of the same
size, and every destination device takes the same number of buffers; which positions go into
a buffer, and where an incoming entry lands, are per-device tables the programs index by the
device's place in the mesh. A route exists when those counts agree (true of every layout
`layout.assign_chunks` makes for power-of-two plans); otherwise moves fall back to one
transfer per piece.
"""

from __future__ import annotations

import dataclasses

from nitsum_jax.model import ChunkLayout


@dataclasses.dataclass(frozen=True)
class MoveRoute:
    # gather[i][t]: the source positions packed into buffer t on source device i.
    gather: tuple[tuple[tuple[int, ...], ...], ...]
    # (buffer t, source device index, destination device index): one transfer each.
    transfers: tuple[tuple[int, int, int], ...]
    # Per destination device index: its incoming (t, source index), in the order u the
    # scatter program takes them.
    sources: tuple[tuple[tuple[int, int], ...], ...]
    # scatter[j][u][q]: the destination position that entry q of incoming buffer u lands in, on
    # destination device j.
    scatter: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def per_buffer(self) -> int:
        return len(self.gather[0][0])

    @property
    def incoming(self) -> int:
        return len(self.sources[0])


def plan_route(src: ChunkLayout, dst: ChunkLayout) -> MoveRoute | None:
    """The packed route from a lane of layout `src` to one of layout `dst`, or None."""
    dest_of = {c: j for j, row in enumerate(dst.assign) for c in row}
    gather, transfers = [], []
    for i, row in enumerate(src.assign):
        by_dest: dict[int, list[int]] = {}
        for r, c in enumerate(row):
            by_dest.setdefault(dest_of[c], []).append(r)
        for t, (j, _) in enumerate(sorted(by_dest.items())):
            transfers.append((t, i, j))
        gather.append(tuple(tuple(slots) for _, slots in sorted(by_dest.items())))
    if len({len(g) for g in gather}) != 1 or len({len(s) for g in gather for s in g}) != 1:
        return None
    where = {c: (i, r) for i, row in enumerate(src.assign) for r, c in enumerate(row)}
    buffer_of = {(i, r): (t, q) for i, g in enumerate(gather) for t, slots in enumerate(g)
                 for q, r in enumerate(slots)}
    sources, scatter = [], []
    for row in dst.assign:
        incoming: list[tuple[int, int]] = []
        lands: dict[tuple[int, int], dict[int, int]] = {}
        for r, c in enumerate(row):
            i, sr = where[c]
            t, q = buffer_of[(i, sr)]
            if (t, i) not in incoming:
                incoming.append((t, i))
            lands.setdefault((t, i), {})[q] = r
        sources.append(tuple(incoming))
        scatter.append(tuple(tuple(lands[key][q] for q in sorted(lands[key])) for key in incoming))
    if len({len(s) for s in sources}) != 1:
        return None
    return MoveRoute(tuple(gather), tuple(transfers), tuple(sources), tuple(scatter))
