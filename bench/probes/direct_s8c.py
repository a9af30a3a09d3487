"""Session 8, call D: how steady is a move's measured rate? The switch-cost probe's statistic
(measure_move: median of 10 moves, contents checked) taken in 8 rounds for the moves into or out
of one GPU, at 1024 and 4096 tokens, with the default transport (copy engines for adjacent pages,
polling waits) and with the kernel only (NITSUM_MOVE_ENGINE_RUNS=0), rounds interleaved; min /
median / max over the rounds.

    PYTHONPATH=.:bench/probes python bench/probes/direct_s8c.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax

from direct_s8 import make_plan_set
from nitsum_jax.kernels import peer_pages
from nitsum_jax.plans.probe import measure_move

PAIRS = [("tp1@0", "tp1@1"), ("tp2@0-1", "tp1@3"), ("tp1@2", "tp2@0-1"), ("tp4@0-3", "tp1@3")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--movers", default="default,kernel")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ps, lanes = make_plan_set()
    movers = {"default": ps.peer_mover, "kernel": peer_pages.PeerPageMover(ps.devices, engine_runs=0)}
    movers = {k: v for k, v in movers.items() if k in args.movers.split(",")}
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, mover in movers.items():
            ps.peer_mover = mover
            for tokens in (1024, 4096):
                for a, b in PAIRS:
                    m = measure_move(ps, lanes[a], lanes[b], tokens, 10)
                    assert m["contents_equal"], (name, tokens, a, b)
                    rates.setdefault(f"{name} {tokens} {a}->{b}", []).append(m["GB_per_s"])
    out = {"device": jax.devices()[0].device_kind, "rounds": args.rounds, "GB_per_s": rates}
    if args.out:
        with open(f"{args.out}/direct_s8c.json", "w") as f:
            json.dump(out, f, indent=2)
    for key, r in rates.items():
        print(f"{key}: min {min(r):.0f} median {statistics.median(r):.0f} max {max(r):.0f} GB/s "
              f"(rounds >= 300: {sum(x >= 300 for x in r)}/{len(r)})")


if __name__ == "__main__":
    main()
