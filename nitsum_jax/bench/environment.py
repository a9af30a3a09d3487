"""Where a bench ran: machine, accelerators, code version; NVML utilization when a GPU is there."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path


def git_commit() -> dict:
    """HEAD of the checkout this package runs from, and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine_info(with_jax: bool = True) -> dict:
    import psutil

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hostname": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    if with_jax:
        import jax

        devices = jax.devices()
        info |= {"jax": jax.__version__, "backend": jax.default_backend(), "device_count": len(devices),
                 "device_kind": devices[0].device_kind if devices else None,
                 "xla_flags": os.environ.get("XLA_FLAGS", "")}
    return info


class NvmlSampler:
    """Mean GPU utilization (percent, per GPU) over a window, sampled by NVML every `period_s`.
    `available` is False without a GPU or without pynvml; then `stop()` returns None."""

    def __init__(self, period_s: float = 0.2):
        self.period_s, self.available = period_s, False
        self._samples: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
            self.available = bool(self._handles)
        except Exception:  # no driver, no GPU or no pynvml: utilization is simply not reported
            self.available = False

    def start(self) -> None:
        if not self.available:
            return
        self._samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-nvml", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._samples.append([self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles])

    def stop(self) -> list[float] | None:
        if not self.available or self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        if not self._samples:
            return None
        return [float(sum(col) / len(col)) for col in zip(*self._samples)]
