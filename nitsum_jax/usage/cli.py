"""`nitsum-jax usage`: a ledger's report per tenant and tier, or its rows (`--requests`), as a
table, JSON or CSV. Reads through a read-only connection, so it is safe while a server writes."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys

from nitsum_jax.usage.report import list_requests, parse_time, summarize
from nitsum_jax.usage.schema import COLUMNS, LedgerError, open_ro

SUMMARY_FIELDS = ("tenant", "tier", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "judged",
                  "missed", "slo_attainment", "missed_ttft", "missed_tpot", "missed_error",
                  "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s")


def _time_arg(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_usage_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `usage` to the `nitsum-jax` subcommands."""
    p = subparsers.add_parser("usage", help="usage ledger report per tenant and tier (serve --usage-db)",
                              description="Requests, tokens, SLO attainment, misses by reason and p50/p99 "
                                          "latencies per tenant and tier, from a usage ledger. Times are epoch "
                                          "seconds or ISO 8601 (UTC without an offset); a request counts in "
                                          "the window it finished in.")
    p.add_argument("--db", required=True, help="the ledger file (serve --usage-db PATH)")
    p.add_argument("--since", type=_time_arg, default=None, help="from this finish time (inclusive)")
    p.add_argument("--until", type=_time_arg, default=None, help="to this finish time (exclusive)")
    p.add_argument("--tenant", default=None, help="only this tenant")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")
    p.add_argument("--requests", action="store_true", help="list the requests instead of the per-tier report")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.since is not None and args.until is not None and args.until <= args.since:
        print(f"nitsum-jax usage: error: --until {args.until} is not after --since {args.since}", file=sys.stderr)
        return 2
    try:
        conn = open_ro(args.db)
    except LedgerError as e:
        print(f"nitsum-jax usage: error: {e}", file=sys.stderr)
        return 2
    try:
        query = list_requests if args.requests else summarize
        records = query(conn, args.since, args.until, args.tenant)
    finally:
        conn.close()
    fields = COLUMNS if args.requests else SUMMARY_FIELDS
    if args.json:
        window = {"db": str(args.db), "since": args.since, "until": args.until, "tenant": args.tenant}
        print(json.dumps({**window, "requests" if args.requests else "groups": records}, indent=2))
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    else:
        _print_table(records, args.requests)
    return 0


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def _print(title: str, headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A rich table whose figures are never folded or cut (a narrow terminal wraps the headers)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD)
    for i, header in enumerate(headers):
        table.add_column(header, min_width=max((len(row[i]) for row in rows), default=1), overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: as wide as the table needs, not 80 columns
        wanted = console.measure(table, options=console.options.update_width(4096)).maximum
        console.width = max(console.width, wanted)
    console.print(table)


def _print_table(records: list[dict], requests: bool) -> None:
    if requests:
        rows = [(dt.datetime.fromtimestamp(r["finish_time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                 r["request_id"], r["tenant"], r["tier"], r["api"], r["status"], str(r["prompt_tokens"]),
                 str(r["completion_tokens"]), _ms(r["ttft_s"]), _ms(r["tpot_s"]), _flag(r["ttft_met"]),
                 _flag(r["tpot_met"])) for r in records]
        _print("requests", ("finished (UTC)", "request", "tenant", "tier", "api", "status", "prompt", "completion",
                            "TTFT ms", "TPOT ms", "TTFT met", "TPOT met"), rows)
        return
    rows = [(g["tenant"], g["tier"], str(g["requests"]), f"{g['prompt_tokens']} ({g['cached_tokens']})",
             str(g["completion_tokens"]),
             "-" if g["slo_attainment"] is None else f"{g['slo_attainment']:.1%} of {g['judged']}",
             f"{g['missed_ttft']}/{g['missed_tpot']}/{g['missed_error']}",
             *(f"{_ms(g[f'{k}_p50_s'])} / {_ms(g[f'{k}_p99_s'])}" for k in ("ttft", "tpot", "e2e")))
            for g in records]
    _print("usage per tenant and tier", ("tenant", "tier", "requests", "prompt (cached)", "completion", "SLO met",
                                         "missed TTFT/TPOT/error", "TTFT ms p50/p99", "TPOT ms p50/p99",
                                         "e2e ms p50/p99"), rows)
