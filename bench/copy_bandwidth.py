"""A card's memory bandwidth as the best device-to-device copy it reaches: the denominator of
decode MBU in bench/gpu_step.py, reported beside the spec sheet's figure.

A copy of N bytes reads N and writes N, so its bandwidth is 2 N / time. Three ways, each timed
per call (the host waits for every copy) and summarised by the median of `repeats`:
- `driver`: `cuMemcpyDtoDAsync` through the CUDA driver on the two buffers' device pointers, on
  a stream of our own (GPU only; on other platforms the way is reported with its error).
- `jit_copy`: an XLA program that writes the source into a donated buffer (XLA cannot elide it:
  the output must live in the donated buffer, not in the source).
- `jit_scale`: an XLA elementwise multiply (read + write), the probe this script used before;
  kept for comparison: on one H200 it read 3,276-3,433 GB/s on 2 GiB and 3,917 on 8 GiB, where
  torch's copy_ of 8 GiB read 4,240 (issue 23).
The denominator is the highest median among the ways that ran. Buffers of at least 8 GiB on a
GPU (smaller ones read low); on host devices a small buffer, since the figure means nothing there.
"""

from __future__ import annotations

import ctypes
import statistics
import time

import jax
import jax.numpy as jnp

from nitsum_jax.kernels.cuda import Contexts, CudaError, check

GPU_GIB = 8.0  # copies of 8 GiB and more reach the card's best figure (issue 23)
HOST_GIB = 1 / 16  # host devices: keeps the test's process small (a 2 GiB probe once took ~19 GB)
# Spec-sheet HBM bandwidth (TB/s) by device kind; kinds not listed report None.
SPEC_TBPS = {"NVIDIA H200": 4.8, "NVIDIA H100 80GB HBM3": 3.35}


def default_gib(device) -> float:
    return GPU_GIB if device.platform == "gpu" else HOST_GIB


def _buffers(device, gib: float):
    """(source, destination): uint32 words [n] on `device`, made there (no host copy)."""
    n = int(gib * 2**30) // 4
    sharding = jax.sharding.SingleDeviceSharding(device)
    src = jax.jit(lambda: jax.lax.iota(jnp.uint32, n), out_shardings=sharding)()
    dst = jax.jit(lambda: jnp.zeros((n,), jnp.uint32), out_shardings=sharding)()
    return jax.block_until_ready((src, dst))


def _summary(nbytes: int, times: list[float], equal: bool) -> dict:
    return {"GBps": 2 * nbytes / statistics.median(times) / 1e9, "best_GBps": 2 * nbytes / min(times) / 1e9,
            "median_ms": statistics.median(times) * 1e3, "equal": equal}


def _same(a, b) -> bool:
    return bool(jax.jit(lambda x, y: jnp.array_equal(x, y))(a, b))


def driver_copy(device, src, dst, repeats: int) -> dict:
    """cuMemcpyDtoDAsync src -> dst on a stream of our own, waited for after each copy."""
    cu = Contexts([device])  # CudaError off GPUs
    lib, stream = cu.lib, cu.stream(device.id)
    src_ptr, dst_ptr = ctypes.c_uint64(src.unsafe_buffer_pointer()), ctypes.c_uint64(dst.unsafe_buffer_pointer())
    size = ctypes.c_size_t(src.nbytes)
    times = []
    for i in range(repeats + 2):  # two warm-up copies
        cu.use(device.id)
        t0 = time.perf_counter()
        check(lib, lib.cuMemcpyDtoDAsync_v2(dst_ptr, src_ptr, size, stream), "cuMemcpyDtoDAsync")
        cu.synchronize(stream)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return _summary(src.nbytes, times, _same(src, dst))


def jit_copy(src, dst, repeats: int) -> dict:
    copy = jax.jit(lambda into, x: jax.lax.dynamic_update_slice(into, x, (0,)), donate_argnums=0)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        dst = jax.block_until_ready(copy(dst, src))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return _summary(src.nbytes, times, _same(src, dst))


def jit_scale(src, repeats: int) -> dict:
    scale = jax.jit(lambda x: x * jnp.uint32(3))
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        out = jax.block_until_ready(scale(src))
        if i >= 2:
            times.append(time.perf_counter() - t0)
        del out
    return _summary(src.nbytes, times, True)


def measure(device, gib: float | None = None, repeats: int = 10) -> dict:
    """Each way's copy figures, the best median (`GBps`, the MBU denominator) and the spec sheet's."""
    gib = default_gib(device) if gib is None else gib
    if not gib > 0:
        raise ValueError(f"copy buffer of {gib} GiB; expected a size > 0 (>= {GPU_GIB} on a GPU)")
    src, dst = _buffers(device, gib)
    ways: dict[str, dict] = {}
    try:
        ways["driver"] = driver_copy(device, src, dst, repeats)
    except CudaError as e:
        ways["driver"] = {"error": str(e)}
    ways["jit_copy"] = jit_copy(src, dst, repeats)  # dst is donated here: not used after
    ways["jit_scale"] = jit_scale(src, repeats)
    del src, dst
    ran = {k: w for k, w in ways.items() if "GBps" in w}
    best = max(ran, key=lambda k: ran[k]["GBps"])
    spec = SPEC_TBPS.get(device.device_kind)
    return {"device": device.device_kind, "buffer_GiB": gib, "repeats": repeats, "ways": ways, "best": best,
            "GBps": ran[best]["GBps"], "spec_GBps": spec * 1e3 if spec else None}
