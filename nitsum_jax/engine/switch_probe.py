"""What a plan switch costs, timed on an idle engine: every switch to another plan and back with
nothing running (no KV moves), and KV moves of a sequence between each kind of lane pair."""

from __future__ import annotations

import statistics
import time


def measure_switch_costs(engine, tokens: int | None = None, repeats: int = 5, max_moves: int = 8) -> dict:
    """Switch to every other plan and back `repeats` times with nothing running, and move a
    `tokens`-token sequence (default: the grid's longest, whole pages) between lanes of the plan
    set, one ordered lane pair per kind of move (TP degrees, shared devices), at most
    `max_moves`, contents checked after the moves.

    Lanes and the controller are held off meanwhile; the probe's switches are not kept in
    `stats()`. The free pages of the lanes get random contents (no live sequence holds them).
    Raises RuntimeError while requests run or wait."""
    from nitsum_jax.plans.probe import fill_random, measure_move

    core, plan_set = engine.core, engine.plan_set
    with engine._cond:
        while engine._in_step:  # a lane may still be finishing a step
            engine._cond.wait(0.05)
        # From here on the lock is held: lanes, the control loop and `submit` wait for the probe.
        if core.entries:
            raise RuntimeError("measure_switch_costs needs an idle engine (requests are running or waiting)")
        engine._switching = True  # and lanes do not chain steps past it
        start_plan, kept, history = core.plan_name, len(core.switches), len(core.plan_history)
        try:
            switch_ms: dict[str, list[float]] = {}
            for _ in range(repeats):
                for name in plan_set.plans:
                    if name == start_plan:
                        continue
                    for target in (name, start_plan):
                        engine._switch_now(target, "switch-cost probe")
                        key = f"{core.switches[-1].from_plan}->{target}"
                        switch_ms.setdefault(key, []).append(core.switches[-1].duration_s * 1e3)
            moves = _probe_moves(plan_set, tokens or engine.grid.max_seq_len, repeats, max_moves, fill_random,
                                 measure_move)
        finally:
            del core.switches[kept:], core.plan_history[history:]
            if core.controller is not None:
                core.controller.force(start_plan, time.monotonic())
            engine._switching = False
            engine._cond.notify_all()
    all_ms = [t for ts in switch_ms.values() for t in ts]
    return {"switch_ms": {k: statistics.median(v) for k, v in switch_ms.items()},
            "switch_ms_max": max(all_ms) if all_ms else None,
            "switch_ms_median": statistics.median(all_ms) if all_ms else None,
            "moves": moves, "repeats": repeats, "move_transport": plan_set.move_transport,
            "move_transport_note": plan_set.move_transport_note}


def _probe_moves(plan_set, tokens: int, repeats: int, max_moves: int, fill_random, measure_move) -> list[dict]:
    lanes = list(plan_set.lanes.values())
    for i, lane in enumerate(lanes):
        fill_random(lane, 1000 + i)
    pages = min(lane.pages_per_seq for lane in lanes)
    tokens = min(tokens, pages * lanes[0].page_size)
    moves, kinds = [], set()
    for src in lanes:
        for dst in lanes:
            kind = (src.spec.tp, dst.spec.tp, bool(set(src.spec.devices) & set(dst.spec.devices)))
            if src is dst or kind in kinds or len(moves) >= max_moves:
                continue
            kinds.add(kind)
            moves.append({"src": src.name, "dst": dst.name, **measure_move(plan_set, src, dst, tokens, repeats)})
    return moves
