"""Session 8, call E: where a 1024-token move's ~0.13 ms beyond its copy goes. Time stamps inside
PlanSet.move and PeerPageMover.move (host waits, planning, issue, the wait for the copy) for
TP1 -> TP1 moves: alternating directions as measure_move does, the same direction repeated, with
a 1 ms pause before each timed move, and with Python's garbage collector off.

    PYTHONPATH=.:bench/probes python bench/probes/direct_s8e.py --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import jax

from direct_s8 import make_plan_set
from nitsum_jax.kernels import peer_pages

STAMPS: list[tuple[str, float]] = []
HOWS = ("alternate", "same", "pause", "nogc")


class _StampedWaits:
    """The mover's CUDA contexts, stamping "issued" when the first wait of a move begins."""

    def __init__(self, cu):
        self.cu, self.first = cu, True

    def __getattr__(self, name):
        return getattr(self.cu, name)

    def _stamp(self):
        if self.first:
            STAMPS.append(("issued", time.perf_counter()))
            self.first = False

    def wait(self, stream):
        self._stamp()
        self.cu.wait(stream)

    def synchronize(self, stream):
        self._stamp()
        self.cu.synchronize(stream)


class Stamped(peer_pages.PeerPageMover):
    """The default mover with time stamps: entering move, after the host's wait for both caches
    (the first address lookup follows it), once planned (run begins), once issued (the first
    stream wait), once copied."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cu = _StampedWaits(self.cu)

    def move(self, src, dst, src_pages, dst_pages):
        STAMPS.append(("mover in", time.perf_counter()))
        self.ready_stamped, self.cu.first = False, True
        moved = super().move(src, dst, src_pages, dst_pages)
        STAMPS.append(("copied", time.perf_counter()))
        return moved

    def addresses(self, lane):
        if not self.ready_stamped:
            STAMPS.append(("ready", time.perf_counter()))
            self.ready_stamped = True
        return super().addresses(lane)

    def run(self, work, dst):
        STAMPS.append(("planned", time.perf_counter()))
        super().run(work, dst)


def pattern(ps, src, dst, tokens, how: str, n=30) -> dict:
    seq = ("diag", how)
    src.allocator.reserve(seq, tokens)
    steps: dict[str, list[float]] = {}
    holder = src
    for i in range(2 * n + 4):
        a, b = (src, dst) if holder is src else (dst, src)
        if how == "same" and i % 2 == 1:
            a, b = src, dst  # timed moves only, src -> dst: put it back untimed first
        timed = a is src and i >= 4
        if how == "pause" and timed:
            time.sleep(0.001)
        jax.block_until_ready(a.kv)
        STAMPS.clear()
        t0 = time.perf_counter()
        if how == "same" and holder is dst:
            ps.move(seq, dst, src)
            holder = src
            continue
        ps.move(seq, a, b)
        t1 = time.perf_counter()
        jax.block_until_ready(b.kv)
        t2 = time.perf_counter()
        holder = b
        if timed:
            marks = [("start", t0)] + STAMPS + [("move out", t1), ("bur", t2)]
            for (_, x), (name, y) in zip(marks, marks[1:]):
                steps.setdefault(name, []).append((y - x) * 1e6)
            steps.setdefault("total", []).append((t2 - t0) * 1e6)
    if seq in holder.allocator:
        holder.allocator.free(seq)
    return {k: round(statistics.median(v), 1) for k, v in steps.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--hows", default=",".join(HOWS))
    args = ap.parse_args()
    ps, lanes = make_plan_set()
    out = {"device": jax.devices()[0].device_kind, "us": {}}
    for engine_runs in (4, 0):
        ps.peer_mover = Stamped(ps.devices, engine_runs=engine_runs)
        for a, b in (("tp1@0", "tp1@1"), ("tp2@0-1", "tp1@3")):
            for how in args.hows.split(","):
                if how == "nogc":
                    gc.disable()
                r = pattern(ps, lanes[a], lanes[b], 1024, how)
                gc.enable()
                key = f"{'engine' if engine_runs else 'kernel'} {a}->{b} {how}"
                out["us"][key] = r
                print(key, json.dumps(r), f"-> {134.2 / r['total'] * 1e3:.0f} GB/s", flush=True)
    if args.out:
        with open(f"{args.out}/direct_s8e.json", "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
