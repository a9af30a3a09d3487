"""Device-to-device copies between GPUs issued straight to the CUDA driver (`cuMemcpyPeerAsync`
through ctypes): an experiment for KV moves (bench/gpu_transfer.py, way "cuda").
Measured on 2x H200 (BENCHMARKS.md, "KV moves"): the copy alone runs at the link's speed, but a move's
pipeline (gather, copy, scatter) was no faster than with `jax.device_put`, so the engine does
not use it.

The idea: `jax.device_put` between two GPUs starts its copy 0.5-0.7 ms after it is asked to, even
when the source is ready (BENCHMARKS.md, "KV moves", traces of 537 MB moves); a compiled
`ppermute` was slower still. The copy engine itself moves a device pair's bytes at ~395 GB/s.
Here the host waits for the source buffers, enqueues one copy per (source, destination) device
pair on a stream of its own (so pairs run side by side), and waits for them, all in tens of
microseconds of host time.

Rules that keep this safe with XLA's runtime:
- Only buffers the caller owns are touched: the source is a finished gather output, the
  destination a landing buffer that no program reads while it is written (see PlanSet).
- Both are ready before the copy is enqueued (`jax.block_until_ready`), and the copies are
  complete (`cuStreamSynchronize`) before any program reads the destination.
- The primary context of each device is the one XLA uses; peer access is enabled between every
  pair (XLA usually has done it already).
"""

from __future__ import annotations

import ctypes
import threading

import jax

from nitsum_jax.kernels.cuda import Contexts, CudaError, driver
from nitsum_jax.kernels.cuda import check as _check

__all__ = ["CudaError", "PeerCopier", "driver"]


class PeerCopier:
    """Copies between single-device arrays on the GPUs `devices`: one stream per ordered pair."""

    def __init__(self, devices: list):
        self.cu = Contexts(devices)  # primary contexts, peer access enabled between every pair (or CudaError)
        self.lib, self.ctx = self.cu.lib, self.cu.ctx
        self.streams = {(a.id, b.id): self.cu.stream(a.id) for a in devices for b in devices if a.id != b.id}
        self._lock = threading.Lock()

    def copy(self, pairs: list[tuple[jax.Array, jax.Array]]) -> int:
        """Copy each source array's bytes into its destination array (same size, one device
        each) and return once every copy is complete. Returns the bytes copied."""
        jax.block_until_ready([a for pair in pairs for a in pair])
        used, total = [], 0
        with self._lock:
            for src, dst in pairs:
                (a,), (b,) = src.devices(), dst.devices()
                if src.nbytes != dst.nbytes:
                    raise ValueError(f"peer copy of {src.nbytes} bytes into a buffer of {dst.nbytes}")
                if a.id == b.id:
                    raise ValueError("peer copy within one device")
                stream = self.streams[(a.id, b.id)]
                _check(self.lib, self.lib.cuCtxSetCurrent(self.ctx[a.id]), "cuCtxSetCurrent")
                _check(self.lib, self.lib.cuMemcpyPeerAsync(
                    dst.unsafe_buffer_pointer(), self.ctx[b.id], src.unsafe_buffer_pointer(), self.ctx[a.id],
                    src.nbytes, stream), "cuMemcpyPeerAsync")
                used.append(stream)
                total += src.nbytes
            for stream in dict.fromkeys(s.value for s in used):
                _check(self.lib, self.lib.cuStreamSynchronize(ctypes.c_void_p(stream)), "cuStreamSynchronize")
        return total
