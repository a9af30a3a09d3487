"""The bench's tables: a rich table on the terminal and the same rows in report.md."""

from __future__ import annotations


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


CLASS_COLUMNS = ("config", "class", "sent", "done", "rej", "fail", "req/s", "tok/s", "goodput req/s", "SLO met",
                 "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "e2e p50", "e2e p99")
CONFIG_COLUMNS = ("config", "req/s", "out tok/s", "goodput req/s", "device busy", "host CPU", "plan switches",
                  "KV moves", "preemptions", "start-up")


def class_rows(results: dict) -> list[tuple[str, ...]]:
    rows = []
    for name, c in results["configs"].items():
        for cls, k in c["classes"].items():
            rows.append((name, cls, str(k["sent"]), str(k["completed"]), str(k["rejected"]), str(k["failed"]),
                         _f(k["throughput_rps"]), _f(k["output_tokens_per_s"], 0), _f(k["goodput_rps"]),
                         _pct(k["slo_attainment"]), _s(k["ttft_p50_s"]), _s(k["ttft_p99_s"]), _s(k["tpot_p50_s"]),
                         _s(k["tpot_p99_s"]), _s(k["e2e_p50_s"]), _s(k["e2e_p99_s"])))
        rows.append((name, "all", str(c["sent"]), str(c["completed"]), str(c["rejected"]), str(c["failed"]),
                     _f(c["throughput_rps"]), _f(c["output_tokens_per_s"], 0), _f(c["goodput_rps"]),
                     _pct(c["slo_attainment"]), *("",) * 6))
    return rows


def config_rows(results: dict) -> list[tuple[str, ...]]:
    return [(name, _f(c["throughput_rps"]), _f(c["output_tokens_per_s"], 0), _f(c["goodput_rps"]),
             _pct(c["device_busy_fraction"]), _pct(c["host_cpu_fraction"]), str(c["plan_switches"]),
             "-" if c["kv_moves"] is None else str(c["kv_moves"]),
             "-" if c["preemptions"] is None else str(c["preemptions"]), _s(c.get("startup_s")))
            for name, c in results["configs"].items()]


def ratio_lines(results: dict) -> list[str]:
    lines = []
    for label, r in results.get("ratios", {}).items():
        parts = [f"throughput {_f(r['throughput_rps'])}x", f"output tok/s {_f(r['output_tokens_per_s'])}x",
                 f"goodput {_f(r['goodput_rps'])}x"]
        parts += [f"{cls} TTFT p99 {_f(v['ttft_p99_s'])}x, goodput {_f(v['goodput_rps'])}x"
                  for cls, v in r["classes"].items()]
        lines.append(f"{label}: " + "; ".join(parts))
    return lines


PROBE_COLUMNS = ("config", "move", "tokens", "MB", "ms", "GB/s", "contents equal")


def probe_rows(results: dict) -> list[tuple[str, ...]]:
    """One row per KV move of each configuration's switch-cost probe."""
    return [(name, f"{m['src']} -> {m['dst']}", str(m["tokens"]), _f(m["MB"], 1), _f(m["ms"], 3),
             _f(m["GB_per_s"], 1), "yes" if m["contents_equal"] else "NO")
            for name, c in results["configs"].items() for m in (c.get("switch_probe") or {}).get("moves", [])]


def probe_lines(results: dict) -> list[str]:
    """The switch-cost probe's plan switches without KV moves, a line per configuration."""
    lines = []
    for name, c in results["configs"].items():
        probe = c.get("switch_probe")
        if probe and probe.get("error"):
            lines.append(f"{name}: switch-cost probe failed: {probe['error']}")
        elif probe and probe.get("switch_ms"):
            lines.append(f"{name}: plan switch without KV moves {_f(probe['switch_ms_median'], 3)} ms median, "
                         f"{_f(probe['switch_ms_max'], 3)} ms max over {len(probe['switch_ms'])} switch kinds x "
                         f"{probe['repeats']} (idle engine, after the run)")
        if probe and probe.get("move_transport"):
            lines.append(f"{name}: KV moves by the {probe['move_transport']} transport "
                         f"({probe.get('move_transport_note', '')})")
    return lines


def title(results: dict) -> str:
    w, m = results["workload"], results["machine"]
    where = f"{m.get('device_count', '?')} x {m.get('device_kind', m.get('backend', '?'))}" if "jax" in m else "server"
    mix = w.get("class_mix")  # a class mix (or a tiers file's even split) decides the classes, not high_fraction
    classes = (", ".join(f"{100 * share:.0f}% {name}" for name, share in mix.items()) if mix
               else f"{100 * w['high_fraction']:.0f}% high")
    return (f"{results['model']} on {where} ({m['hostname']}, {m['cpu_count']} CPU cores); "
            f"{w['kind']} {results['headline_rate_rps']:.3g} req/s, {w['num_requests']} requests, {classes}")


def print_tables(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title=title(results), title_justify="left")
    for col in CLASS_COLUMNS:
        table.add_column(col, justify="left" if col in ("config", "class") else "right")
    configs = list(results["configs"])
    for row in class_rows(results):
        table.add_row(*row, end_section=row[1] == "all" and row[0] != configs[-1],
                      style="bold" if row[1] == "all" else None)
    console.print(table)
    table = Table(title_justify="left")
    for col in CONFIG_COLUMNS:
        table.add_column(col, justify="left" if col == "config" else "right")
    for row in config_rows(results):
        table.add_row(*row)
    console.print(table)
    for line in ratio_lines(results):
        console.print(line)
    rows = probe_rows(results)
    if rows:
        table = Table(title="KV moves between lanes (switch-cost probe, idle engine, after the run)",
                      title_justify="left")
        for col in PROBE_COLUMNS:
            table.add_column(col, justify="left" if col in ("config", "move") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in probe_lines(results):
        console.print(line)


def _md_table(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(r) + " |"
                                                                              for r in rows]


def markdown_report(results: dict) -> str:
    m, w, git = results["machine"], results["workload"], results["git"]
    lines = [f"# nitsum-jax bench, {results['date']}", "", title(results), "",
             f"- commit `{git['commit']}`{' (with uncommitted changes)' if git['dirty'] else ''}",
             f"- machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB"
             + (f"; jax {m['jax']} {m['backend']}, {m['device_count']} devices ({m['device_kind']})" if "jax" in m
                else ""),
             f"- workload: {', '.join(f'{k}={v}' for k, v in w.items())}",
             "- SLO targets: " + ", ".join(f"{c} TTFT {_s(t['ttft_target_s'])} / TPOT {_s(t['tpot_target_s'])}"
                                             for c, t in results["slo"].items()), ""]
    for name, c in results["configs"].items():
        lines.append(f"- `{name}`: {c['backend'].get('plans', c['backend'].get('target', ''))}")
    lines += ["", "## Per class (headline rate)", ""] + _md_table(CLASS_COLUMNS, class_rows(results))
    lines += ["", "## Per configuration", ""] + _md_table(CONFIG_COLUMNS, config_rows(results))
    if results.get("ratios"):
        lines += ["", "## Ratios", ""] + [f"- {line}" for line in ratio_lines(results)]
    if len(results["rates_rps"]) > 1:
        rows = [(name, _f(run["rate_rps"]), _f(run["throughput_rps"]), _f(run["goodput_rps"]),
                 _f(run["output_tokens_per_s"], 0), _pct(run["device_busy_fraction"]))
                for name, c in results["configs"].items() for run in c["by_rate"]]
        lines += ["", "## Rate sweep", ""] + _md_table(("config", "rate", "req/s", "goodput req/s", "tok/s", "busy"),
                                                       rows)
    switches = [(name, s) for name, c in results["configs"].items() for s in c["plan_switch_log"]]
    if switches:
        lines += ["", "## Plan switches (headline rate)", ""]
        lines += [f"- `{name}` at {s['time']:.2f} s: {s['from_plan']} -> {s['to_plan']} ({s['reason']}; "
                  f"{s['moved']} moved{_move_rate(s)}, {s['recomputed']} recomputed, {_s(s['duration_s'])})"
                  for name, s in switches]
    if probe_rows(results) or probe_lines(results):
        lines += ["", "## Switch costs (probe on the idle engine after its runs)", ""]
        lines += [f"- {line}" for line in probe_lines(results)] + [""] + _md_table(PROBE_COLUMNS, probe_rows(results))
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in results.get("plots", [])]
    lines += ["", "Device busy: device-seconds inside lane steps over device-seconds elapsed (the engine's step "
              "timings). Host CPU: this machine's CPU use over the run (on host devices, the real limit).", ""]
    return "\n".join(lines)


def _move_rate(switch: dict) -> str:
    """' (X MB in Y ms, Z GB/s)' for a switch that moved KV (older results lack the fields)."""
    nbytes, seconds = switch.get("moved_bytes") or 0, switch.get("move_s") or 0.0
    if not nbytes or seconds <= 0:
        return ""
    return f" ({nbytes / 1e6:.1f} MB in {seconds * 1e3:.2f} ms, {nbytes / seconds / 1e9:.1f} GB/s)"
