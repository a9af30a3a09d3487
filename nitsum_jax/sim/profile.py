"""A measured profile: what a lane's steps, a KV move and a plan switch cost, per lane shape.

JSON, written by `nitsum-jax profile` (measured on the machine it runs on) or assembled from
recorded measurements; several can be merged. Every figure names its source (an entry of
`sources`: card, device count, date, commit, and how it was obtained), so a merged profile says
where each number came from. Layout:

    {"format": "nitsum-jax-profile/1", "model": {shape fields}, "platform": "gpu" | "cpu",
     "kv_bytes_per_token": int, "device_memory_bytes": int | null,
     "sources": {id: {"card", "devices", "date", "commit", "how"}},
     "lanes": {"tp1/c1": {"tp": 1, "chunks": 1,        # TP degree, weight chunks of the plan set
                          "decode": [{"batch", "context", "ms", "source"}],
                          "prefill": [{"tokens", "context", "ms", "source"}],
                          "sampler": [{"batch", "ms", "source"}]}},
     "moves": [{"src_tp", "dst_tp", "shared_device", "tokens", "GB_per_s", "source"}],
     "switch_ms": {"ms", "source"} | null,
     "host": {"per_step_ms", "per_row_ms", "points": [{"rows", "gap_ms", "rate_rps"}], "source"} | null}

`host` is the engine's own time between steps that are not chained (it plans the step, reads the
last tokens and streams them while the device waits), linear in the step's rows, fitted by
`host_fit` to the real engine's bench runs; absent, the simulator charges no host time.

`chunks` is the number of weight chunks of the plan set the lane was measured in (the largest
TP degree of that set): a TP1 lane in a set that also holds a TP4 lane runs 4 chunk matmuls per
layer and is slower (BENCHMARKS.md, "Decode roofline").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

FORMAT = "nitsum-jax-profile/1"
MODEL_FIELDS = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "dtype")


class ProfileError(ValueError):
    """A profile file is malformed, or profiles to merge do not describe the same model."""


def lane_key(tp: int, chunks: int) -> str:
    return f"tp{tp}/c{chunks}"


def model_shape(cfg) -> dict:
    return {k: getattr(cfg, k) for k in MODEL_FIELDS}


def empty_profile(model: dict, kv_bytes_per_token: int, platform: str,
                  device_memory_bytes: int | None = None) -> dict:
    return {"format": FORMAT, "model": dict(model), "platform": platform, "kv_bytes_per_token": int(kv_bytes_per_token),
            "device_memory_bytes": device_memory_bytes, "sources": {}, "lanes": {}, "moves": [], "switch_ms": None}


def lane_entry(profile: dict, tp: int, chunks: int) -> dict:
    return profile["lanes"].setdefault(lane_key(tp, chunks), {"tp": tp, "chunks": chunks, "decode": [], "prefill": [],
                                                               "sampler": []})


def validate(profile: dict, where: str = "<profile>") -> dict:
    """Raise ProfileError naming the first malformed field; returns the profile."""
    if profile.get("format") != FORMAT:
        raise ProfileError(f"{where}: format {profile.get('format')!r}; expected {FORMAT!r}")
    missing = [k for k in MODEL_FIELDS if k not in profile.get("model", {})]
    if missing:
        raise ProfileError(f"{where}: model shape lacks {missing}")
    sources = profile.get("sources", {})
    for key, lane in profile.get("lanes", {}).items():
        if key != lane_key(lane.get("tp", 0), lane.get("chunks", 0)):
            raise ProfileError(f"{where}: lane {key!r} does not match its tp/chunks")
        if not lane.get("decode"):
            raise ProfileError(f"{where}: lane {key!r} has no decode figures")
        for kind, fields in (("decode", ("batch", "context", "ms")), ("prefill", ("tokens", "context", "ms")),
                             ("sampler", ("batch", "ms"))):
            for row in lane.get(kind, []):
                _check_row(row, fields, sources, f"{where}: lane {key!r} {kind}")
    for row in profile.get("moves", []):
        _check_row(row, ("src_tp", "dst_tp", "tokens", "GB_per_s"), sources, f"{where}: moves")
    if profile.get("switch_ms") is not None:
        _check_row(profile["switch_ms"], ("ms",), sources, f"{where}: switch_ms")
    if profile.get("host") is not None:
        _check_row(profile["host"], ("per_step_ms", "per_row_ms"), sources, f"{where}: host")
    if not profile.get("lanes"):
        raise ProfileError(f"{where}: no lanes")
    return profile


def _check_row(row: dict, fields: tuple[str, ...], sources: dict, where: str) -> None:
    for f in fields:
        value = row.get(f)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ProfileError(f"{where}: {f} = {value!r} must be a number >= 0 (row {row})")
    if row.get("source") not in sources:
        raise ProfileError(f"{where}: source {row.get('source')!r} is not in sources {sorted(sources)}")


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        profile = json.loads(path.read_text())
    except OSError as e:
        raise ProfileError(f"{path}: cannot read the profile ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    return validate(profile, str(path))


def save(profile: dict, path: str | Path) -> None:
    validate(profile, str(path))
    Path(path).write_text(json.dumps(profile, indent=1) + "\n")


def merge(profiles: list[dict]) -> dict:
    """One profile from several of the same model shape. Lane figures of a shape (tp/chunks) that
    several profiles measured come from the first that has it (figures of one machine are never
    mixed inside one lane's grid); moves and the switch cost likewise by kind."""
    if not profiles:
        raise ProfileError("nothing to merge")
    out = copy.deepcopy(profiles[0])
    for other in profiles[1:]:
        if other["model"] != out["model"]:
            raise ProfileError(f"cannot merge profiles of different model shapes: {out['model']} and {other['model']}")
        if other["kv_bytes_per_token"] != out["kv_bytes_per_token"]:
            raise ProfileError("cannot merge profiles with different KV bytes per token")
        for sid, source in other["sources"].items():
            if sid in out["sources"] and out["sources"][sid] != source:
                raise ProfileError(f"source id {sid!r} names two different sources")
            out["sources"].setdefault(sid, source)
        for key, lane in other["lanes"].items():
            out["lanes"].setdefault(key, copy.deepcopy(lane))
        kinds = {_move_kind(m) for m in out["moves"]}
        out["moves"] += [copy.deepcopy(m) for m in other["moves"] if _move_kind(m) not in kinds]
        out["switch_ms"] = out["switch_ms"] or copy.deepcopy(other["switch_ms"])
        out["host"] = out.get("host") or copy.deepcopy(other.get("host"))
        out["device_memory_bytes"] = out["device_memory_bytes"] or other.get("device_memory_bytes")
        if out["platform"] != other["platform"]:
            raise ProfileError(f"cannot merge a {out['platform']} profile with a {other['platform']} one")
    return validate(out, "<merged profile>")


def _move_kind(move: dict) -> tuple:
    return move["src_tp"], move["dst_tp"], bool(move.get("shared_device")), move["tokens"]


def host_points(results: dict) -> list[dict]:
    """From a bench `results.json` of the real engine: per run, the device's idle time per step
    that was not chained (span minus the lanes' busy time, over the unchained steps) and the
    step's mean rows (output tokens per step: each decode row draws one)."""
    points = []
    for name, config in results["configs"].items():
        for run in config["by_rate"]:
            steps = sum(run.get("steps", {}).values())
            unchained = steps - sum((run.get("chained_steps") or {}).values())
            if steps == 0 or unchained <= 0 or not run.get("lane_busy_s") or len(run["lane_busy_s"]) != 1:
                continue  # one lane only: the idle time of several lanes does not add up to one gap
            busy = sum(run["lane_busy_s"].values())
            points.append({"rows": run["output_tokens_per_s"] * run["span_s"] / steps,
                           "gap_ms": max(run["span_s"] - busy, 0.0) * 1e3 / unchained,
                           "rate_rps": run["rate_rps"], "config": name})
    return points


def host_fit(profile: dict, results: list[dict], source_id: str, source: dict,
             fit_rates: tuple[float, ...] | None = None) -> dict:
    """`profile` with its `host` figure: the least-squares line gap_ms = per_step_ms + per_row_ms x
    rows through the runs' points (at least two, of different rows; both terms >= 0). With
    `fit_rates`, only the runs at those rates are fitted; the others are held out (`held_out`),
    their measured gap beside the fit's."""
    import numpy as np

    points = [p for r in results for p in host_points(r)]
    for p in points:
        p["held_out"] = fit_rates is not None and not any(abs(p["rate_rps"] - r) < 1e-9 for r in fit_rates)
    fitted = [p for p in points if not p["held_out"]]
    if len({round(p["rows"], 6) for p in fitted}) < 2:
        raise ProfileError(f"a host fit needs runs of one lane at two loads or more; got {len(fitted)} run(s)")
    x = np.array([p["rows"] for p in fitted])
    y = np.array([p["gap_ms"] for p in fitted])
    slope, intercept = np.polyfit(x, y, 1)
    slope, intercept = max(float(slope), 0.0), max(float(intercept), 0.0)
    for p in points:
        p["fit_ms"] = intercept + slope * p["rows"]
    out = copy.deepcopy(profile)
    if source_id in out["sources"] and out["sources"][source_id] != source:
        raise ProfileError(f"source id {source_id!r} names two different sources")
    out["sources"][source_id] = source
    out["host"] = {"per_step_ms": intercept, "per_row_ms": slope, "points": points, "source": source_id}
    return validate(out, "<profile with host fit>")
