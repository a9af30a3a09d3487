"""The CUDA driver and NVRTC through ctypes: what the direct KV-move kernel (peer_pages.py) and the
raw-copy experiments under bench/ need, with no compiled extension of our own.

Both libraries are looked up at first use; on a machine without them (CPU CI) the functions
return None and callers keep to their XLA paths.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import time

from nitsum_jax.settings import settings

CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704
CU_STREAM_NON_BLOCKING = 1
CUDA_ERROR_NOT_READY = 600


class CudaError(RuntimeError):
    pass


_lock = threading.Lock()
_driver = None
_nvrtc = None


def _load_driver():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    c_int_p, c_void_p_p = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p)
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuDeviceGet.argtypes = [c_int_p, ctypes.c_int]
    lib.cuDeviceGetAttribute.argtypes = [c_int_p, ctypes.c_int, ctypes.c_int]
    lib.cuDevicePrimaryCtxRetain.argtypes = [c_void_p_p, ctypes.c_int]
    lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
    lib.cuCtxEnablePeerAccess.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.cuStreamCreate.argtypes = [c_void_p_p, ctypes.c_uint]
    lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
    lib.cuStreamQuery.argtypes = [ctypes.c_void_p]
    lib.cuMemcpyPeerAsync.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p,
                                      ctypes.c_size_t, ctypes.c_void_p]
    lib.cuMemcpy2DAsync_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.cuModuleLoadData.argtypes = [c_void_p_p, ctypes.c_void_p]
    lib.cuModuleGetFunction.argtypes = [c_void_p_p, ctypes.c_void_p, ctypes.c_char_p]
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                   ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, c_void_p_p,
                                   c_void_p_p]
    return lib


def driver():
    """The CUDA driver library, initialised; None where there is none (CPU machines)."""
    global _driver
    with _lock:
        if _driver is None:
            lib = _load_driver()
            _driver = lib if lib is not None and lib.cuInit(0) == 0 else False
        return _driver or None


def check(lib, result: int, what: str, ok=(0,)) -> None:
    if result not in ok:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(result, ctypes.byref(name))
        raise CudaError(f"{what} failed: {name.value.decode() if name.value else result}")


def _nvrtc_candidates() -> list[str]:
    """libnvrtc from the environment (NITSUM_NVRTC), the pip wheels of NVIDIA's CUDA packages
    (nvidia/cu13/lib, nvidia/cuda_nvrtc/lib), then the system's loader path and CUDA install."""
    names = [settings().nvrtc] if settings().nvrtc else []
    for base in sys.path:
        for pattern in ("nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            names += sorted(p for p in glob.glob(os.path.join(base, pattern)) if "builtins" not in p)
    names += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    names += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    return names


def nvrtc():
    """The NVRTC library (run-time compiler of CUDA C++), or None where it cannot be found."""
    global _nvrtc
    with _lock:
        if _nvrtc is None:
            _nvrtc = False
            for name in _nvrtc_candidates():
                try:
                    lib = ctypes.CDLL(name)
                except OSError:
                    continue
                lib.nvrtcGetErrorString.restype = ctypes.c_char_p
                lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                                   ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
                lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
                lib.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
                lib.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                lib.nvrtcGetCUBINSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
                lib.nvrtcGetCUBIN.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
                _nvrtc = lib
                break
        return _nvrtc or None


def compile_cubin(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """CUDA C++ `source` compiled by NVRTC to machine code for `arch` (e.g. "sm_90")."""
    lib = nvrtc()
    if lib is None:
        raise CudaError("NVRTC (libnvrtc) not found: install NVIDIA's nvidia-cuda-nvrtc wheel or set NITSUM_NVRTC")
    prog = ctypes.c_void_p()

    def ok(result, what):
        if result != 0:
            raise CudaError(f"{what} failed: {lib.nvrtcGetErrorString(result).decode()}")

    ok(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
       "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", *(o.encode() for o in options)]
        result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise CudaError(f"NVRTC could not compile {name}: {log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        ok(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        ok(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class Contexts:
    """The primary context (the one XLA uses) of each GPU in `devices`, keyed by JAX device id,
    with peer access enabled from every one to every other."""

    def __init__(self, devices: list):
        lib = driver()
        if lib is None:
            raise CudaError("no CUDA driver on this machine")
        if any(d.platform != "gpu" for d in devices):
            raise CudaError("CUDA contexts need GPU devices")
        self.lib = lib
        self.ctx: dict[int, ctypes.c_void_p] = {}
        self.ordinal: dict[int, int] = {}
        for d in devices:
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            check(lib, lib.cuDeviceGet(ctypes.byref(dev), d.local_hardware_id), "cuDeviceGet")
            check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            self.ctx[d.id], self.ordinal[d.id] = ctx, dev.value
        for a in devices:
            self.use(a.id)
            for b in devices:
                if a.id != b.id:
                    check(lib, lib.cuCtxEnablePeerAccess(self.ctx[b.id], 0), "cuCtxEnablePeerAccess",
                          ok=(0, CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED))

    def use(self, device_id: int) -> None:
        check(self.lib, self.lib.cuCtxSetCurrent(self.ctx[device_id]), "cuCtxSetCurrent")

    def stream(self, device_id: int) -> ctypes.c_void_p:
        """A new non-blocking stream on the device (does not wait for XLA's streams)."""
        self.use(device_id)
        stream = ctypes.c_void_p()
        check(self.lib, self.lib.cuStreamCreate(ctypes.byref(stream), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        return stream

    def arch(self, device_id: int) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        ordinal = self.ordinal[device_id]
        check(self.lib, self.lib.cuDeviceGetAttribute(ctypes.byref(major), 75, ordinal), "cuDeviceGetAttribute")
        check(self.lib, self.lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, ordinal), "cuDeviceGetAttribute")
        return f"sm_{major.value}{minor.value}"

    def synchronize(self, stream: ctypes.c_void_p) -> None:
        check(self.lib, self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def wait(self, stream: ctypes.c_void_p, spin_s: float = 0.02) -> None:
        """Wait for `stream` by polling it for up to `spin_s`, then blocking: a sub-millisecond copy
        is seen done at once instead of after the blocked thread is woken (tens of us)."""
        query, end = self.lib.cuStreamQuery, time.perf_counter() + spin_s
        while True:
            result = query(stream)
            if result == 0:
                return
            if result != CUDA_ERROR_NOT_READY:
                check(self.lib, result, "cuStreamQuery")
            if time.perf_counter() > end:
                return self.synchronize(stream)
