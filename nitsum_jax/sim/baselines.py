"""Adaptive against the best static deployment, figure by figure and rate by rate.

For each rate of a sweep, each figure (SLO goodput, throughput, the most urgent tier's TTFT
and TPOT p99) is compared with the static configuration best at that figure at that rate, and
names it: a different static may win each figure. The best static's knee is the highest rate
at which some static still kept at least `KNEE_ATTAINMENT` of its requests within SLO.
"""

from __future__ import annotations

KNEE_ATTAINMENT = 0.9  # share of requests within SLO that counts as "still serving the rate"
FIGURES = (("goodput_rps", "SLO goodput req/s", max), ("throughput_rps", "throughput req/s", max),
           ("urgent_ttft_p99_s", "urgent TTFT p99 s", min), ("urgent_tpot_p99_s", "urgent TPOT p99 s", min))


def _figure(run: dict, key: str, urgent: str):
    if key.startswith("urgent_"):
        return run["classes"].get(urgent, {}).get(key[len("urgent_"):])
    return run[key]


def compare(results: dict, adaptive: str, urgent: str) -> dict:
    """{"rates": [{rate, figures: {key: {adaptive, best_static, best_static_name, ratio}}}],
    "knee_rps", "swept_past_knee"} over the configurations of kind shared/dedicated."""
    statics = {n: c for n, c in results["configs"].items() if c.get("kind") in ("shared", "dedicated")}
    if not statics:
        raise ValueError("no static baselines in the results (simulate with --baselines best-static)")
    rows, knee = [], None
    for k, rate in enumerate(results["rates_rps"]):
        runs = {n: c["by_rate"][k] for n, c in statics.items()}
        mine = results["configs"][adaptive]["by_rate"][k]
        figures = {}
        for key, _, best in FIGURES:
            values = {n: v for n, r in runs.items() if (v := _figure(r, key, urgent)) is not None}
            value = _figure(mine, key, urgent)
            if not values:
                figures[key] = {"adaptive": value, "best_static": None, "best_static_name": None, "ratio": None}
                continue
            name = best(sorted(values), key=lambda n: values[n])  # ties: the first by name
            ratio = (value / values[name] if value is not None and values[name] else None)
            figures[key] = {"adaptive": value, "best_static": values[name], "best_static_name": name, "ratio": ratio}
        if any((r["slo_attainment"] or 0) >= KNEE_ATTAINMENT for r in runs.values()):
            knee = rate if knee is None else max(knee, rate)
        rows.append({"rate_rps": rate, "figures": figures})
    return {"rates": rows, "knee_rps": knee, "swept_past_knee": knee is not None and knee < max(results["rates_rps"]),
            "urgent_class": urgent, "statics": sorted(statics)}


def table_rows(comparison: dict) -> list[tuple[str, ...]]:
    """Rows: rate, then per figure 'adaptive vs best (name, ratio)'."""
    rows = []
    for row in comparison["rates"]:
        cells = [f"{row['rate_rps']:.3g}"]
        for key, _, _ in FIGURES:
            f = row["figures"][key]
            value = _rate if key.endswith("rps") else _seconds
            ratio = "-" if f["ratio"] is None else f"{f['ratio']:.2f}x"
            cells.append(f"{value(f['adaptive'])} vs {value(f['best_static'])} ({f['best_static_name']}, {ratio})")
        rows.append(tuple(cells))
    return rows


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


COLUMNS = ("rate",) + tuple(label for _, label, _ in FIGURES)
