"""Simulated lanes: host-side pages (the engine's own allocator) and step times from the fitted
model, and what a KV move between two lanes costs by the profile's bandwidth for that kind of
lane pair. No devices, no JAX."""

from __future__ import annotations

import dataclasses

import numpy as np

from nitsum_jax.pages import PageAllocator
from nitsum_jax.plans.spec import LaneSpec
from nitsum_jax.scheduler import Work
from nitsum_jax.sim.profile import ProfileError
from nitsum_jax.sim.step_model import LaneModel, bucket

CONTEXT_QUANTUM = 16  # tokens: contexts are rounded to this for the step-time cache (a page)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The engine's shape grid (`plans.BucketGrid`) as the simulator needs it."""

    decode_batch: tuple[int, ...] = (1, 8, 32, 64)
    prefill_len: tuple[int, ...] = (256,)
    max_seq_len: int = 8192

    def __post_init__(self):
        for name in ("decode_batch", "prefill_len"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name} {values} must be one or more sizes >= 1")
            object.__setattr__(self, name, tuple(sorted(values)))


class SimLane:
    """What the engine core reads of a lane (`name`, `spec`, `allocator`), and its step time."""

    def __init__(self, spec: LaneSpec, num_pages: int, page_size: int, model: LaneModel, grid: Grid,
                 host: dict | None = None):
        self.name, self.spec = spec.name, spec
        self.allocator = PageAllocator(num_pages, page_size)
        self.model, self.grid = model, grid
        self._host = (host["per_step_ms"] / 1e3, host["per_row_ms"] / 1e3) if host else (0.0, 0.0)

    def host_seconds(self, work: list[Work]) -> float:
        """The engine's host time before a step that is not chained (the profile's `host` fit;
        0 without one): the device idles for it."""
        per_step, per_row = self._host
        return per_step + per_row * len(work)

    def programs(self, work: list[Work]) -> int:
        """How many step programs `engine.dispatch.dispatch_work` enqueues for `work`."""
        singles = sum(1 for w in work if w.num_tokens == 1)
        return -(-singles // self.grid.decode_batch[-1]) + (len(work) - singles)

    def step_seconds(self, work: list[Work]) -> float:
        """The step's programs, as `dispatch_work` enqueues them: decode rows in batches of at
        most the largest bucket (each padded to its bucket, at the rows' mean context), each
        prefill chunk alone (padded to its bucket, at its start position); greedy rows only."""
        model, grid = self.model, self.grid
        singles = [w.start_pos for w in work if w.num_tokens == 1]
        ms = 0.0
        top = grid.decode_batch[-1]
        for i in range(0, len(singles), top):
            rows = singles[i:i + top]
            context = _quantize(sum(rows) / len(rows))
            ms += model.decode_ms(bucket(grid.decode_batch, len(rows)), context)
        for w in work:
            if w.num_tokens > 1:
                ms += model.prefill_ms(bucket(grid.prefill_len, w.num_tokens), _quantize(w.start_pos))
        return ms / 1e3


def _quantize(context: float) -> int:
    return int(context // CONTEXT_QUANTUM) * CONTEXT_QUANTUM


class MoveCosts:
    """Seconds of a KV move between two lanes: bytes / the profile's bandwidth for the pair's kind
    (TP degrees, whether they share a device), interpolated over the moved sizes measured and held
    at the edges. A kind the profile lacks takes the nearest measured kind by TP degrees (and is
    listed in `fallbacks`)."""

    def __init__(self, profile: dict):
        self.kinds: dict[tuple[int, int, bool], tuple[np.ndarray, np.ndarray]] = {}
        rows: dict[tuple[int, int, bool], dict[int, float]] = {}
        for m in profile.get("moves", []):
            rows.setdefault((m["src_tp"], m["dst_tp"], bool(m.get("shared_device"))), {})[m["tokens"]] = m["GB_per_s"]
        for kind, by_tokens in rows.items():
            tokens = sorted(by_tokens)
            self.kinds[kind] = (np.array(tokens, float), np.array([by_tokens[t] * 1e9 for t in tokens]))
        self.kv_bytes_per_token = profile["kv_bytes_per_token"]
        self.fallbacks: dict[tuple, tuple] = {}

    def seconds(self, src: LaneSpec, dst: LaneSpec, nbytes: int) -> float:
        kind = (src.tp, dst.tp, bool(set(src.devices) & set(dst.devices)))
        if kind not in self.kinds:
            if not self.kinds:
                raise ProfileError("the profile has no KV move figures (a plan set with moves needs them)")
            near = min(self.kinds, key=lambda k: (abs(k[0] - kind[0]) + abs(k[1] - kind[1]), k[2] != kind[2], k))
            self.fallbacks[kind] = near
            kind = near
        tokens, bandwidth = self.kinds[kind]
        return nbytes / float(np.interp(nbytes / self.kv_bytes_per_token, tokens, bandwidth))
