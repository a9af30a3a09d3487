"""Where does a serving step's time go? Summarise a `jax.profiler` trace taken during a bench run
(NITSUM_BENCH_PROFILE=DIR:START:SECONDS, see nitsum_jax/bench/runner.py).

Per GPU: the fraction of the traced window in which a kernel ran (the union of kernel
intervals), the idle gaps (count, total, median, 90th percentile, longest), and the kernels
that took the most time. Per host thread: the trace events with the most total time, so that
an idle GPU can be matched with what the host was doing.

    python bench/trace_summary.py DIR [--out summary.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics

import jax


def merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def summarize(path: str, top: int = 8) -> dict:
    data = jax.profiler.ProfileData.from_file(path)
    gpus, hosts = {}, {}
    for plane in data.planes:
        if plane.name.startswith("/device:GPU:"):
            kernels, per_name = [], {}
            for line in plane.lines:
                if "stream" not in line.name.lower() or "xla" in line.name.lower():
                    continue  # kernel lines only (XLA op lines repeat the same time)
                for ev in line.events:
                    kernels.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                    per_name[ev.name] = per_name.get(ev.name, 0) + ev.duration_ns
            if kernels:
                gpus[plane.name] = (merge(kernels), per_name)
        elif plane.name.startswith("/host:"):
            for i, line in enumerate(plane.lines):
                totals: dict[str, list[float]] = {}
                for ev in line.events:
                    t = totals.setdefault(ev.name, [0, 0])
                    t[0] += ev.duration_ns
                    t[1] += 1
                if totals:
                    hosts[f"{plane.name} {line.name or f'thread #{i}'}"] = totals
    if not gpus and not hosts:
        return {"error": "no events in the trace"}
    if gpus:
        start = min(iv[0][0] for iv, _ in gpus.values())
        end = max(iv[-1][1] for iv, _ in gpus.values())
    else:  # host devices (CPU): only the host threads are summarised
        start = min(ev.start_ns for plane in data.planes if plane.name.startswith("/host:")
                    for line in plane.lines for ev in line.events)
        end = max(ev.start_ns + ev.duration_ns for plane in data.planes if plane.name.startswith("/host:")
                  for line in plane.lines for ev in line.events)
    window = max(end - start, 1)
    out = {"window_ms": window / 1e6, "gpus": {}, "host_threads": {}}
    for name, (merged, per_name) in sorted(gpus.items()):
        busy = sum(b - a for a, b in merged)
        gaps = [b[0] - a[1] for a, b in zip(merged, merged[1:])]
        long = sorted(g for g in gaps if g > 100_000)  # > 0.1 ms
        out["gpus"][name] = {
            "busy_fraction": round(busy / window, 3),
            "idle_gaps_over_0.1ms": len(long),
            "idle_ms_in_those": round(sum(long) / 1e6, 2),
            "gap_p50_ms": round(statistics.median(long) / 1e6, 3) if long else 0,
            "gap_p90_ms": round(long[int(0.9 * (len(long) - 1))] / 1e6, 3) if long else 0,
            "gap_max_ms": round(long[-1] / 1e6, 3) if long else 0,
            "top_kernels_ms": {k[:80]: round(v / 1e6, 2) for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]},
        }
    busiest = sorted(hosts.items(), key=lambda kv: -sum(v[0] for v in kv[1].values()))[:12]
    for name, totals in busiest:
        out["host_threads"][name[:90]] = {
            k[:80]: {"ms": round(v[0] / 1e6, 2), "n": v[1]}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {}
    for path in sorted(glob.glob(f"{args.dir}/**/*.xplane.pb", recursive=True)):
        result[path] = s = summarize(path)
        print(path)
        if "error" in s:
            print("  ", s["error"])
            continue
        print(f"  window {s['window_ms']:.0f} ms")
        for gpu, g in s["gpus"].items():
            print(f"  {gpu}: busy {g['busy_fraction']:.0%}, {g['idle_gaps_over_0.1ms']} gaps > 0.1 ms "
                  f"({g['idle_ms_in_those']} ms; p50 {g['gap_p50_ms']} p90 {g['gap_p90_ms']} max {g['gap_max_ms']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
