"""Session 8, call B: KV-move waits and copy paths on 4 GPUs. Whole moves (measure_move, median
of 20, contents checked) at 1024 and 4096 tokens, twice in turn to show the spread between
rounds, for: the direct kernel waited for by polling the stream (the new default) or by a
blocking cuStreamSynchronize (before), and copy-engine pitched copies on 1 or 4 streams a GPU;
then the device time of a TP1 -> TP1 move (CUDA events around the kernel, or the copies on one
stream) against the host's time for the same launches.

    PYTHONPATH=. python bench/probes/direct_s8b.py --out $OUT
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import jax

from direct_s8 import PAIRS, finish, make_plan_set, plan_work, spread
from nitsum_jax.kernels import peer_pages
from nitsum_jax.plans.probe import measure_move


def device_ms(mover, work, stream, n=20):
    """Median device time (CUDA events) and host time of running `work`, all on `stream`."""
    lib = mover.cu.lib
    lib.cuEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
    lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.cuEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
    runner = work[0].runner
    mover.cu.use(runner)
    start, end = ctypes.c_void_p(), ctypes.c_void_p()
    lib.cuEventCreate(ctypes.byref(start), 0)
    lib.cuEventCreate(ctypes.byref(end), 0)
    dev, host = [], []
    for i in range(n + 2):
        t0 = time.perf_counter()
        mover.cu.use(runner)
        lib.cuEventRecord(start, stream)
        for item in work:
            if isinstance(item, peer_pages.Launch):
                mover._launch(item)
            else:
                mover._copy(item, stream)
        mover.cu.use(runner)
        lib.cuEventRecord(end, stream)
        mover.cu.wait(stream)
        host.append(time.perf_counter() - t0)
        ms = ctypes.c_float()
        lib.cuEventElapsedTime(ctypes.byref(ms), start, end)
        dev.append(ms.value)
    return statistics.median(dev[2:]), statistics.median(host[2:]) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ps, lanes = make_plan_set()
    out = {"device": jax.devices()[0].device_kind, "moves": {}, "device_time": {}}
    rows = []
    spin = peer_pages.PeerPageMover(ps.devices, "push", engine_runs=0)
    block = peer_pages.PeerPageMover(ps.devices, "push", engine_runs=0)
    block.spin = False
    movers = {"kernel spin": spin, "kernel block": block,
              "engine x1": peer_pages.PeerPageMover(ps.devices, "push", engine_runs=8, engine_streams=1),
              "engine x4": peer_pages.PeerPageMover(ps.devices, "push", engine_runs=8, engine_streams=4)}
    for layout in ("adjacent", "spread"):
        spread(lanes, layout == "spread")
        for rnd in (1, 2):
            for name, mover in movers.items():
                if layout == "spread" and name.startswith("engine"):
                    continue
                ps.peer_mover = mover
                for tokens in (1024, 4096):
                    for a, b in PAIRS:
                        m = measure_move(ps, lanes[a], lanes[b], tokens, args.repeats)
                        key = f"{layout} r{rnd} {name} {tokens} {a}->{b}"
                        out["moves"][key] = {k: m[k] for k in ("ms", "GB_per_s", "contents_equal")}
                        rows.append(f"{key}: {m['GB_per_s']:.0f} GB/s{'' if m['contents_equal'] else ' NOT EQUAL'}")
                        print(rows[-1], flush=True)
    spread(lanes, False)
    src, dst = lanes["tp1@0"], lanes["tp1@1"]
    for tokens in (1024, 4096):
        src.allocator.reserve("b", tokens)
        dst.allocator.reserve("b", tokens)
        sp, dp = src.allocator.pages("b"), dst.allocator.pages("b")
        for name in ("kernel spin", "engine x1"):
            mover = movers[name]
            work = plan_work(mover, src, dst, sp, dp, 0 if name == "kernel spin" else 1)
            nbytes = sum(w.nbytes for w in work)
            dev, host = device_ms(mover, work, mover.streams[src.devices[0].id])
            out["device_time"][f"{name} {tokens}"] = {"device_ms": dev, "host_ms": host, "MB": nbytes / 1e6,
                                                      "device_GB_per_s": nbytes / dev / 1e6}
            rows.append(f"device {name} {tokens} tp1@0->tp1@1: device {dev:.3f} ms ({nbytes / dev / 1e6:.0f} GB/s), "
                        f"host {host:.3f} ms ({nbytes / host / 1e6:.0f} GB/s)")
            print(rows[-1], flush=True)
        src.allocator.free("b")
        dst.allocator.free("b")
    finish(out, rows, args.out, "direct_s8b")


if __name__ == "__main__":
    main()
