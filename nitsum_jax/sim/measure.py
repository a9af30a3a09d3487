"""`nitsum-jax profile`: measure, on this machine's devices, what the simulator's profile holds.

For each chunk layout C (a plan set whose widest lane has C devices) and each TP degree t <= C,
a real lane of the plan set (`plans.PlanSet`, its compiled programs, `Lane.dispatch`) is timed:
decode programs over batch buckets and contexts, prefill chunks over chunk sizes and contexts,
the sampler (a batch of sampled rows against the same batch greedy). KV moves are timed with
`plans.probe.measure_move` for each kind of lane pair (TP degrees, a shared device); the plan
switch without moves is the engine core's own switch (`begin_switch` / `end_switch`) between
the plan set's plans, timed on the host. Each figure is the median of `repeats` after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import numpy as np

from nitsum_jax.plans.spec import LaneSpec, Plan
from nitsum_jax.sampling import SamplingBatch, SamplingParams
from nitsum_jax.sim import profile as P

PROMPT_VOCAB = 256


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rows(lane, rng, batch: int, context: int, width: int, seq: str):
    """Host arrays of a step of `batch` rows at `context` cached tokens, `width` new tokens each;
    the rows' pages are reserved (free them with `_free`)."""
    ids = [(seq, i) for i in range(batch)]
    for sid in ids:
        lane.allocator.reserve(sid, context + width)
    tokens = rng.integers(0, PROMPT_VOCAB, (batch, width)).astype(np.int32)  # [batch, width]
    start = np.full(batch, context, np.int32)  # [batch]
    num_new = np.full(batch, width, np.int32)  # [batch]
    table = lane.allocator.page_table(ids, lane.pages_per_seq)  # [batch, pages_per_seq]
    return ids, tokens, start, num_new, table


def _free(lane, ids) -> None:
    for sid in ids:
        lane.allocator.free(sid)


def time_lane(lane, entry: dict, source: str, contexts: list[int], prefill_contexts: list[int],
              repeats: int, rng: np.random.Generator) -> None:
    """Decode, prefill and sampler figures of one lane into its profile entry."""
    grid = lane.grid
    for context in contexts:
        for b in grid.decode_batch:
            ids, tokens, start, num_new, table = _rows(lane, rng, b, context, 1, "decode")
            ms = _median_ms(lambda: lane.dispatch(tokens, start, num_new, table, None), repeats)
            entry["decode"].append({"batch": b, "context": context, "ms": ms, "source": source})
            _free(lane, ids)
    for context in prefill_contexts:
        for t in grid.prefill_len:
            ids, tokens, start, num_new, table = _rows(lane, rng, 1, context, t, "prefill")
            ms = _median_ms(lambda: lane.dispatch(tokens, start, num_new, table, None), repeats)
            entry["prefill"].append({"tokens": t, "context": context, "ms": ms, "source": source})
            _free(lane, ids)
    drawing = SamplingParams(temperature=1.0, top_p=0.95)
    for b in grid.decode_batch:
        ids, tokens, start, num_new, table = _rows(lane, rng, b, contexts[0], 1, "sampler")
        sampling = SamplingBatch.from_params([drawing] * b, list(range(b)), [contexts[0] + 1] * b)
        sampled = _median_ms(lambda: lane.dispatch(tokens, start, num_new, table, sampling), repeats)
        greedy = _median_ms(lambda: lane.dispatch(tokens, start, num_new, table, None), repeats)
        entry["sampler"].append({"batch": b, "ms": max(0.0, sampled - greedy), "source": source})
        _free(lane, ids)


def layout_plans(chunks: int, num_devices: int) -> tuple[Plan, ...]:
    """A plan per TP degree t <= chunks (one lane on devices 0..t-1), and, where the devices allow,
    a second TP1 lane on the last device (so moves between lanes on other devices are measured)."""
    plans, t = [], 1
    while t <= chunks:
        plans.append(Plan(f"tp{t}", (LaneSpec(("all",), t, tuple(range(t))),)))
        t *= 2
    if num_devices > 1:
        plans.append(Plan("tp1-last", (LaneSpec(("all",), 1, (num_devices - 1,)),)))
    return tuple(plans)


def time_moves(plan_set, profile: dict, source: str, tokens: list[int], repeats: int) -> None:
    from nitsum_jax.plans.probe import fill_random, measure_move

    lanes = list(plan_set.lanes.values())
    for i, lane in enumerate(lanes):
        fill_random(lane, 1000 + i)
    seen = {(m["src_tp"], m["dst_tp"], m["shared_device"], m["tokens"]) for m in profile["moves"]}
    for src in lanes:
        for dst in lanes:
            shared = bool(set(src.spec.devices) & set(dst.spec.devices))
            for n in tokens:
                kind = (src.spec.tp, dst.spec.tp, shared, n)
                if src is dst or kind in seen:
                    continue
                seen.add(kind)
                m = measure_move(plan_set, src, dst, n, repeats)
                profile["moves"].append({"src_tp": src.spec.tp, "dst_tp": dst.spec.tp, "shared_device": shared,
                                         "tokens": m["tokens"], "GB_per_s": m["GB_per_s"], "ms": m["ms"],
                                         "source": source})


def time_switch(plan_set, plans: tuple[Plan, ...], repeats: int) -> float:
    """Median ms of the engine core's switch between two plans with nothing running (the host
    work of a switch without KV moves: `Engine._switch_now` minus its moves)."""
    from nitsum_jax.engine.core import EngineCore
    from nitsum_jax.scheduler import default_classes

    classes = default_classes()
    lanes = {lane.name: lane for lane in plan_set.lanes.values()}
    core = EngineCore(classes, plans, lanes)
    times = []
    for i in range(repeats + 1):
        target = plans[(i + 1) % len(plans)].name
        t0 = time.perf_counter()
        plan = core.begin_switch(target)
        core.end_switch(target, "profile", plan, 0, 0, 0.0, 0.0, float(i))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def layouts(cfg, num_devices: int) -> list[int]:
    """Chunk counts a plan set over `num_devices` can have: powers of two dividing the heads."""
    out, c = [], 1
    while c <= num_devices and cfg.num_heads % c == 0 and cfg.ffn_dim % c == 0:
        out.append(c)
        c *= 2
    return out


def measure_profile(cfg, params, devices: list, *, batches=(1, 4), contexts=(16, 64), prefill_lens=(16, 32),
                    prefill_contexts=(0, 32), repeats: int = 5, page_size: int = 16, move_tokens=(64,),
                    log: Callable[[str], None] = lambda line: None) -> dict:
    """A profile of every lane shape `devices` allow (see the module docstring)."""
    from nitsum_jax.bench.environment import git_commit
    from nitsum_jax.kv import kv_bytes_per_page
    from nitsum_jax.plans import BucketGrid, PlanSet

    n = len(devices)
    kind = devices[0].device_kind
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    profile = P.empty_profile(P.model_shape(cfg), kv_bytes_per_page(cfg, 1), devices[0].platform,
                              (stats or {}).get("bytes_limit"))
    source = f"{kind.replace(' ', '_')}x{n}-{time.strftime('%Y-%m-%d')}"
    profile["sources"][source] = {"card": kind, "devices": n, "date": time.strftime("%Y-%m-%d"),
                                  "commit": git_commit()["commit"],
                                  "how": f"nitsum-jax profile, medians of {repeats} after a warm-up"}
    longest = max(max(contexts) + 1, max(prefill_contexts) + max(prefill_lens), max(move_tokens))
    max_seq = -(-longest // page_size) * page_size
    num_pages = max(batches) * (max_seq // page_size) + 2 * (max_seq // page_size) + 8
    grid = BucketGrid(decode_batch=tuple(sorted(batches)), prefill_len=tuple(sorted(prefill_lens)),
                      max_seq_len=max_seq, min_move_pages=1)
    rng = np.random.default_rng(0)
    chunk_counts = layouts(cfg, n)
    for chunks in chunk_counts:
        plans = layout_plans(chunks, n)
        log(f"layout of {chunks} chunk(s): compiling {', '.join(str(p) for p in plans)}")
        plan_set = PlanSet(cfg, params, plans, devices=devices, num_pages=num_pages, page_size=page_size, grid=grid)
        for lane in plan_set.lanes.values():
            key = P.lane_key(lane.spec.tp, chunks)
            if key not in profile["lanes"]:
                log(f"timing lane {lane.name} ({key})")
                time_lane(lane, P.lane_entry(profile, lane.spec.tp, chunks), source, list(contexts),
                          list(prefill_contexts), repeats, rng)
        if chunks == chunk_counts[-1]:
            log("timing KV moves and plan switches")
            time_moves(plan_set, profile, source, list(move_tokens), repeats)
            profile["switch_ms"] = {"ms": time_switch(plan_set, plans, repeats), "source": source}
    return P.validate(profile)
