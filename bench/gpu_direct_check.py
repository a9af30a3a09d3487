"""On the GPU machine: the direct KV-move transport (nitsum_jax/kernels/peer_pages.py) run for real.

1. `tiny` model on 4 GPUs: a sequence walks tp4 > tp2 > tp4 > tp1 > tp2 > tp2 (other GPUs) > tp1 >
   tp1 > tp4 with a decode step on each lane, moved by the kernel (push, then pull): its tokens
   and teacher-forced NLL must be those of the single-device run that never moved (the CPU tests'
   walk, tests/test_plans.py).
2. The 8B shape (bf16, random pages): for each lane pair, a 4096-token sequence moved there by the
   kernel (push, pull) or the copy engines (the default for adjacent pages) and back by the packed
   transport lands bit-identical in the source lane's pages.
Prints PASS/FAIL lines; exits 1 on any failure.

    PYTHONPATH=.:tests python bench/gpu_direct_check.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from nitsum_jax.config import preset
from nitsum_jax.kernels import peer_pages
from nitsum_jax.generate import Generator
from nitsum_jax.model import init_params
from nitsum_jax.plans import BucketGrid, PlanSet, parse_plans
from nitsum_jax.plans.probe import fill_random

sys.path.insert(0, "tests")
from test_plans import GREEDY, PAGE_SIZE, prompts, walk_moves  # noqa: E402

PLANS = "big: all=tp4@0-3; mix: high=tp2@0-1, low=tp1@2, low=tp1@3; pair: low=tp2@0-1, low=tp2@2-3"
failed = []
VARIANTS = (("push", 0), ("pull", 0), ("push", peer_pages.ENGINE_RUNS))  # kernel push, pull; copy engines


def label(mode: str, engine_runs: int) -> str:
    return "copy engines" if engine_runs else f"kernel {mode}"


def bits(a):
    """The array's bits as unsigned integers (exact comparison, on the device)."""
    return jax.lax.bitcast_convert_type(a, {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize])


def direct(ps: PlanSet) -> None:
    """On a machine without GPUs (trying the script): the tests' host executor of the kernel's rule."""
    if ps.peer_mover is None:
        from test_peer_pages import HostExecutor
        ps.peer_mover = HostExecutor("push", peer_pages.ENGINE_RUNS)
        ps.use_transport("direct")


def check(name: str, fn) -> None:
    try:
        fn()
        print(f"PASS {name}", flush=True)
    except Exception as e:  # report every check, then fail the script
        failed.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)


def tiny_walks() -> None:
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(1234))
    want = Generator(cfg, params, page_size=PAGE_SIZE, max_batch=4, prefill_chunk=16,
                     max_seq_len=64).generate(prompts(), GREEDY)[2]
    ps = PlanSet(cfg, params, parse_plans(PLANS), num_pages=24, page_size=PAGE_SIZE, move_transport=TRANSPORT,
                 grid=BucketGrid(decode_batch=(1, 4), prefill_len=(16,), max_seq_len=64))
    direct(ps)
    lanes = ps.lanes
    route = [lanes[(0, 1, 2, 3)], lanes[(0, 1)], lanes[(0, 1, 2, 3)], lanes[(2,)], lanes[(0, 1)], lanes[(2, 3)],
             lanes[(3,)], lanes[(2,)], lanes[(0, 1, 2, 3)]]
    for mode, engine_runs in VARIANTS:
        ps.peer_mover.mode, ps.peer_mover.engine_runs = mode, engine_runs
        check(f"tiny walk, direct {label(mode, engine_runs)}: tokens and NLL of the unmoved run",
              lambda: walk_moves(cfg, ps, route, want))


def round_trips() -> None:
    cfg = preset("llama-3.1-8b" if TRANSPORT == "direct" else "tiny")
    tokens = 4096 if TRANSPORT == "direct" else 256
    ps = PlanSet(cfg, None, parse_plans(PLANS), num_pages=1024, page_size=16, move_transport=TRANSPORT,
                 grid=BucketGrid(decode_batch=(8,), prefill_len=(), max_seq_len=tokens, min_move_pages=tokens // 16))
    direct(ps)
    for i, lane in enumerate(ps.lanes.values()):
        fill_random(lane, i)
    lanes = list(ps.lanes.values())
    for mode, engine_runs in VARIANTS:
        ps.peer_mover.mode, ps.peer_mover.engine_runs = mode, engine_runs
        for src in lanes:
            for dst in lanes:
                if src is dst:
                    continue

                def trip(src=src, dst=dst):
                    seq = ("trip", src.name, dst.name)
                    src.allocator.reserve(seq, tokens)
                    pages = src.allocator.pages(seq)
                    k, v, _ = src.gather_pages(pages)
                    before = [bits(a) for a in k + v]
                    ps.use_transport("direct")
                    ps.move(seq, src, dst)
                    src.allocator.reserve("spacer", tokens)  # the way back lands on other page ids
                    ps.use_transport("packed")
                    ps.move(seq, dst, src)
                    ps.use_transport("direct")
                    back = src.allocator.pages(seq)
                    k, v, _ = src.gather_pages(back)
                    after = [bits(a) for a in k + v]
                    src.allocator.free(seq)
                    src.allocator.free("spacer")
                    assert back != pages, "the way back reused the same page ids"
                    for x, y in zip(before, after):
                        assert bool(jnp.all(x == y)), "pages differ after the round trip"
                check(f"8B 4096 tokens, direct {label(mode, engine_runs)} {src.name} -> {dst.name}, packed back: bit-identical", trip)


TRANSPORT = "direct" if jax.devices()[0].platform == "gpu" else "packed"

if __name__ == "__main__":
    print(jax.devices(), flush=True)
    tiny_walks()
    round_trips()
    print(f"{len(failed)} failed", flush=True)
    sys.exit(1 if failed else 0)
