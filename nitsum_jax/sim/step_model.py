"""Step times from a profile: piecewise-linear interpolation over the measured grid.

A decode program's time is interpolated in batch at each measured context, then in context;
a prefill chunk's likewise in chunk tokens, then context. Outside the measured range a figure is
held at its edge (never extrapolated), and `coverage` says which ranges were measured. The fit's
error is measured by leaving each interior grid point out and predicting it from its neighbours
(`held_out_error`). A step of the engine is the programs `engine/dispatch.py` enqueues for it:
decode rows in batches of at most the largest decode bucket, each prefill chunk alone, plus the
sampler for a program with a sampled row, so its time is their sum. Nothing here is a constant
of its own: every figure comes from the profile.
"""

from __future__ import annotations

import bisect
from functools import lru_cache

import numpy as np

from nitsum_jax.sim.profile import ProfileError, lane_key


class Surface:
    """ms over (x, context): at each measured context a 1-D table over x (batch or chunk tokens)."""

    def __init__(self, rows: list[dict], x_field: str):
        by_context: dict[int, dict[int, float]] = {}
        for row in rows:
            by_context.setdefault(int(row["context"]), {})[int(row[x_field])] = float(row["ms"])
        self.contexts = sorted(by_context)
        self.tables = [(np.array(sorted(t), float), np.array([t[x] for x in sorted(t)], float))
                       for t in (by_context[c] for c in self.contexts)]

    def __call__(self, x: float, context: float) -> float:
        values = [float(np.interp(x, xs, ms)) for xs, ms in self.tables]
        if len(values) == 1:
            return values[0]
        return float(np.interp(context, self.contexts, values))

    @property
    def x_range(self) -> tuple[int, int]:
        return int(min(xs[0] for xs, _ in self.tables)), int(max(xs[-1] for xs, _ in self.tables))

    def held_out(self) -> list[float]:
        """Relative errors of predicting each interior point from the others of its axis."""
        errors = []
        for (xs, ms) in self.tables:  # interior batch / chunk points, at their own context
            for i in range(1, len(xs) - 1):
                pred = np.interp(xs[i], np.delete(xs, i), np.delete(ms, i))
                errors.append(abs(pred - ms[i]) / ms[i])
        for k in range(1, len(self.contexts) - 1):  # interior contexts, from the neighbouring ones
            xs, ms = self.tables[k]
            for x, m in zip(xs, ms):
                lo = float(np.interp(x, *self.tables[k - 1]))
                hi = float(np.interp(x, *self.tables[k + 1]))
                c0, c, c1 = self.contexts[k - 1], self.contexts[k], self.contexts[k + 1]
                errors.append(abs(lo + (hi - lo) * (c - c0) / (c1 - c0) - m) / m)
        return errors


class LaneModel:
    """One lane shape (TP degree, weight chunks of its plan set)."""

    def __init__(self, entry: dict):
        self.tp, self.chunks = entry["tp"], entry["chunks"]
        self.decode = Surface(entry["decode"], "batch")
        self.prefill = Surface(entry["prefill"], "tokens") if entry.get("prefill") else None
        sampler = sorted((int(r["batch"]), float(r["ms"])) for r in entry.get("sampler", []))
        self.sampler = (np.array([b for b, _ in sampler], float), np.array([m for _, m in sampler], float))
        self.decode_ms = lru_cache(maxsize=65536)(self._decode_ms)
        self.prefill_ms = lru_cache(maxsize=65536)(self._prefill_ms)

    def _decode_ms(self, batch: int, context: int) -> float:
        return self.decode(batch, context)

    def _prefill_ms(self, tokens: int, context: int) -> float:
        if self.prefill is None:
            raise ProfileError(f"lane shape {lane_key(self.tp, self.chunks)} has no prefill figures")
        return self.prefill(tokens, context)

    def sampler_ms(self, batch: int) -> float:
        if not len(self.sampler[0]):
            raise ProfileError(f"lane shape {lane_key(self.tp, self.chunks)} has no sampler figures")
        return float(np.interp(batch, *self.sampler))


class StepModel:
    """Every lane shape of a profile, and the chunk layout fallback: a lane of TP t in a plan set
    of C chunks uses the figures measured at (t, C), else those of TP t nearest in chunks (and
    says so in `fallbacks`)."""

    def __init__(self, profile: dict):
        self.profile = profile
        self.lanes = {key: LaneModel(entry) for key, entry in profile["lanes"].items()}
        self.fallbacks: dict[str, str] = {}

    def lane(self, tp: int, chunks: int) -> LaneModel:
        key = lane_key(tp, chunks)
        if key in self.lanes:
            return self.lanes[key]
        same_tp = sorted((abs(m.chunks - chunks), k) for k, m in self.lanes.items() if m.tp == tp)
        if not same_tp:
            raise ProfileError(f"the profile has no figures for a TP{tp} lane; it has "
                               f"{sorted(self.lanes)} (run `nitsum-jax profile` on a machine with {tp} devices)")
        self.fallbacks[key] = same_tp[0][1]
        return self.lanes[same_tp[0][1]]

    def held_out_error(self) -> dict:
        """Per lane shape and kind: held-out points, mean and max relative error."""
        out = {}
        for key, model in self.lanes.items():
            for kind, surface in (("decode", model.decode), ("prefill", model.prefill)):
                errors = surface.held_out() if surface is not None else []
                out[f"{key} {kind}"] = {"points": len(errors),
                                        "mean_rel": float(np.mean(errors)) if errors else None,
                                        "max_rel": float(np.max(errors)) if errors else None}
        return out

    def coverage(self) -> dict:
        """What was measured, per lane shape: the ranges beyond which figures are held at the edge."""
        out = {}
        for key, m in self.lanes.items():
            out[key] = {"decode_batch": m.decode.x_range, "decode_context": (m.decode.contexts[0], m.decode.contexts[-1])}
            if m.prefill is not None:
                out[key] |= {"prefill_tokens": m.prefill.x_range,
                             "prefill_context": (m.prefill.contexts[0], m.prefill.contexts[-1])}
        return out


def bucket(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket >= n (the engine's grid: `BucketGrid.batch_for`); buckets sorted."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} is outside the buckets {list(buckets)}")
    return buckets[i]
