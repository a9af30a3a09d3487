"""Trace replay: requests read from a CSV or JSONL file, one request a row.

Columns (either format), by the first of their accepted names present:
- arrival, seconds: `arrival_s`, `arrived_at` (the Splitwise / Vidur traces), `arrival_time`, `timestamp`
- prompt tokens: `prompt_len`, `num_prefill_tokens`, `prompt_tokens`, `input_tokens`
  (or `prompt`, a text, JSONL only)
- output tokens: `output_len`, `num_decode_tokens`, `output_tokens`
- class (optional): `class`, `priority_class`; without it, classes are drawn by a seeded share
- `temperature`, `seed` (optional): a sampled request

Timestamps (`arrived_at`, `arrival_time`, `timestamp`, as the Splitwise files carry them) are
shifted to start at 0; `arrival_s` are offsets from the start and replay as written (a trace the
bench wrote comes back as it was). `time_scale` multiplies them (< 1 replays faster);
`target_rate` instead scales them so the mean rate (requests / span) is that many requests/s.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from nitsum_jax.bench.workload import PROMPT_VOCAB, BenchRequest, Workload, assign_classes

COLUMNS = {
    "arrival": ("arrival_s", "arrived_at", "arrival_time", "timestamp"),
    "prompt": ("prompt_len", "num_prefill_tokens", "prompt_tokens", "input_tokens"),
    "output": ("output_len", "num_decode_tokens", "output_tokens"),
    "class": ("class", "priority_class"),
}


def _rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({error.msg})") from None
    return rows


def _pick(row: dict, key: str):
    for name in COLUMNS[key]:
        if name in row and row[name] not in (None, ""):
            return row[name]
    return None


def _request(row: dict, index: int, where: str, rng: np.random.Generator, id_prefix: str,
             with_ids: bool) -> tuple[float, BenchRequest]:
    arrival, plen, olen = _pick(row, "arrival"), _pick(row, "prompt"), _pick(row, "output")
    prompt = row.get("prompt")
    try:
        if arrival is None or olen is None or (plen is None and prompt is None):
            missing = [k for k, v in (("arrival", arrival), ("output", olen)) if v is None] or ["prompt"]
            raise KeyError(f"no {missing[0]} column (accepted: {', '.join(COLUMNS[missing[0]])})")
        n = len(prompt) if prompt is not None else int(float(plen))
        out = int(float(olen))
        if n < 1 or out < 1:
            raise ValueError(f"prompt tokens {n} and output tokens {out} must be >= 1")
        ids = tuple(int(t) for t in rng.integers(0, PROMPT_VOCAB, n)) if with_ids and prompt is None else ()
        cls = _pick(row, "class")
        request = BenchRequest(f"{id_prefix}{index:05d}", 0.0, "" if cls is None else str(cls), n, out, prompt, ids,
                               temperature=float(row.get("temperature", 0.0) or 0.0),
                               seed=int(row.get("seed", 0) or 0))
        return float(arrival), request
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{where}: bad trace row ({error}); expected an arrival, prompt tokens and output "
                         f"tokens (see nitsum_jax.bench.trace)") from None


def load_trace(path: str | Path, *, seed: int = 0, time_scale: float = 1.0, target_rate: float | None = None,
               id_prefix: str = "r", class_mix: dict[str, float] | None = None, high_fraction: float = 0.3,
               with_ids: bool = True, limit: int | None = None) -> Workload:
    """The trace's requests in arrival order. Rows without a class get one drawn by `class_mix`
    (class -> share), else `high_fraction` of them `high` and the rest `low`. `limit`: the first
    this many requests. `with_ids` False: no prompt ids are drawn (the simulator needs only lengths)."""
    path = Path(path)
    if not time_scale > 0:
        raise ValueError(f"time scale must be > 0, got {time_scale}")
    if target_rate is not None and not target_rate > 0:
        raise ValueError(f"target rate must be > 0 requests/s, got {target_rate}")
    rng = np.random.default_rng(seed)
    rows = _rows(path)[:limit]
    if not rows:
        raise ValueError(f"{path}: no requests in the trace")
    timed = [_request(row, i, f"{path}:{i + 2 if path.suffix.lower() == '.csv' else i + 1}", rng, id_prefix, with_ids)
             for i, row in enumerate(rows)]
    timed.sort(key=lambda t: t[0])
    offsets = all("arrival_s" in row for row in rows)  # else timestamps: the first one is the start
    t0 = 0.0 if offsets else timed[0][0]
    span = timed[-1][0] - timed[0][0]
    scale = time_scale if target_rate is None else (len(timed) / target_rate) / max(span, 1e-9)
    mix = class_mix or {"high": high_fraction, "low": 1.0 - high_fraction}
    drawn = assign_classes(rng, len(timed), mix)
    requests = []
    for k, (arrival, r) in enumerate(timed):
        requests.append(BenchRequest(f"{id_prefix}{k:05d}", round((arrival - t0) * scale, 6),
                                     r.priority_class or str(drawn[k]), r.prompt_len, r.output_len, r.prompt,
                                     r.prompt_ids, r.temperature, r.seed))
    classes = [r.priority_class for r in requests]
    duration = requests[-1].arrival_s
    params = {"kind": "trace", "path": str(path), "num_requests": len(requests), "time_scale": scale,
              "target_rate_rps": target_rate, "seed": seed,
              "class_mix": {c: classes.count(c) / len(classes) for c in sorted(set(classes))},
              "high_fraction": classes.count("high") / len(classes),
              "rate_rps": len(requests) / max(1e-9, duration),
              "prompt_tokens_median": float(np.median([r.prompt_len for r in requests])),
              "output_tokens_median": float(np.median([r.output_len for r in requests]))}
    return Workload(tuple(requests), params)
