"""Does a sequence's page layout change a direct KV move's speed? The 8B shape, 4096-token moves
(measure_move, median of 10, contents checked) on lanes whose pages are all free (the allocator
hands out the lowest free pages: a sequence's pages are adjacent) and where a random half of each
lane's pages is held (a sequence's pages spread over the pool, as while serving), with the engine's
pool size (2048 pages).

    PYTHONPATH=. python bench/probes/direct_scatter.py
"""

from __future__ import annotations

import random

from nitsum_jax.config import preset
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.plans.probe import fill_random, measure_move

PLANS = "mixed: high=tp2@0-1, low=tp1@2, low=tp1@3; burst: low=tp1@0, low=tp1@1, low=tp1@2, low=tp1@3"
PAIRS = [("tp1@0", "tp1@1"), ("tp2@0-1", "tp1@3"), ("tp1@2", "tp2@0-1"), ("tp2@0-1", "tp1@0")]

if __name__ == "__main__":
    ps = PlanSet(preset("llama-3.1-8b"), None, parse_plans(PLANS), num_pages=2048, page_size=16,
                 grid=BucketGrid(decode_batch=(8,), prefill_len=(), max_seq_len=4096, min_move_pages=256))
    for i, lane in enumerate(ps.lanes.values()):
        fill_random(lane, i)
    lanes = {lane.name: lane for lane in ps.lanes.values()}
    for layout in ("adjacent", "spread"):
        if layout == "spread":
            for lane in lanes.values():
                held = random.Random(lane.name).sample(range(lane.allocator.num_pages), lane.allocator.num_pages // 2)
                for p in range(lane.allocator.num_pages):
                    lane.allocator.reserve(("filler", p), lane.page_size)
                for p in set(range(lane.allocator.num_pages)) - set(held):
                    lane.allocator.free(("filler", p))
        for a, b in PAIRS:
            m = measure_move(ps, lanes[a], lanes[b], 4096, 10)
            print(f"{layout} {ps.move_transport} {a}->{b}: {m['ms']:.3f} ms {m['GB_per_s']:.0f} GB/s "
                  f"equal={m['contents_equal']}", flush=True)
