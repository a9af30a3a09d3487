"""The usage report on a ledger of known rows: exact counts, tokens, SLO attainment, misses by
reason, percentiles, the time window, and `nitsum-jax usage` as a table, JSON and CSV."""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

from nitsum_jax.cli import main as cli_main
from nitsum_jax.usage import UsageLedger, UsageRow, load, parse_time, usage_report

REPO = pathlib.Path(__file__).resolve().parents[1]
T0 = 1_764_547_200.0  # 2025-12-01T00:00:00Z
TARGETS = {"high": (0.5, 0.05), "low": (10.0, 0.5)}


def known_row(request_id, tenant, tier, *, at, ttft, tpot, prompt, completion, met, status="OK",
              finish_reason="length", cached=0, server_error=False) -> UsageRow:
    """A request that arrived `at` seconds after T0 and ran with the given TTFT / TPOT."""
    arrival = T0 + at
    first = None if ttft is None else arrival + ttft
    finish = (first or arrival) + (tpot or 0.0) * max(completion - 1, 0) + (0.0 if first else 0.3)
    return UsageRow(request_id=request_id, tenant=tenant, tier=tier, api="grpc", plan="mixed", lane="tp1@0", tp=1,
                    moved=False, arrival_time=arrival, first_token_time=first, finish_time=finish,
                    prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
                    finish_reason=finish_reason, status=status, ttft_s=ttft, tpot_s=tpot,
                    ttft_target_s=TARGETS[tier][0], tpot_target_s=TARGETS[tier][1], ttft_met=met[0],
                    tpot_met=met[1], server_error=server_error)


ROWS = [
    known_row("a1", "acme", "high", at=10, ttft=0.1, tpot=0.02, prompt=10, completion=5, met=(True, True), cached=4),
    known_row("a2", "acme", "high", at=11, ttft=0.8, tpot=0.03, prompt=20, completion=6, met=(False, True)),
    known_row("a3", "acme", "high", at=12, ttft=0.2, tpot=0.09, prompt=30, completion=7, met=(True, False)),
    known_row("a4", "acme", "high", at=13, ttft=None, tpot=None, prompt=40, completion=0, met=(None, None),
              status="INTERNAL", finish_reason="error", server_error=True),
    known_row("a5", "acme", "high", at=14, ttft=None, tpot=None, prompt=50, completion=0, met=(None, None),
              status="CANCELLED", finish_reason="cancelled"),  # the client left before the target passed
    known_row("a6", "acme", "low", at=15, ttft=1.0, tpot=0.1, prompt=11, completion=3, met=(True, True)),
    known_row("a7", "acme", "low", at=16, ttft=3.0, tpot=None, prompt=12, completion=1, met=(True, None)),
    known_row("b1", "beta", "high", at=20, ttft=0.9, tpot=0.2, prompt=8, completion=4, met=(False, False),
              status="200", cached=2),
]


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("usage") / "usage.db"
    with UsageLedger(path) as ledger:
        for row in ROWS:
            assert ledger.record(row)
    return path


def by_group(report):
    return {(g["tenant"], g["tier"]): g for g in report}


def test_report_counts_requests_and_tokens_per_tenant_and_tier(ledger_path):
    groups = by_group(usage_report(ledger_path))
    assert list(groups) == [("acme", "high"), ("acme", "low"), ("beta", "high")]
    high = groups[("acme", "high")]
    assert (high["requests"], high["prompt_tokens"], high["cached_tokens"], high["completion_tokens"]) == \
        (5, 150, 4, 18)
    assert (groups[("acme", "low")]["requests"], groups[("acme", "low")]["completion_tokens"]) == (2, 4)
    assert (groups[("beta", "high")]["prompt_tokens"], groups[("beta", "high")]["cached_tokens"]) == (8, 2)


def test_attainment_is_over_judged_requests_and_misses_are_counted_by_reason(ledger_path):
    groups = by_group(usage_report(ledger_path))
    high = groups[("acme", "high")]
    # a5 (cancelled before its target) has no verdict; a2 misses TTFT, a3 TPOT, a4 is an error.
    assert (high["judged"], high["missed"], high["slo_attainment"]) == (4, 3, 0.25)
    assert (high["missed_ttft"], high["missed_tpot"], high["missed_error"]) == (1, 1, 1)
    low = groups[("acme", "low")]
    assert (low["judged"], low["missed"], low["slo_attainment"]) == (2, 0, 1.0)
    beta = groups[("beta", "high")]  # one request missing both targets: two reasons, one miss
    assert (beta["missed"], beta["missed_ttft"], beta["missed_tpot"], beta["slo_attainment"]) == (1, 1, 1, 0.0)


def test_percentiles_are_linear_over_the_requests_that_have_the_figure(ledger_path):
    high = by_group(usage_report(ledger_path))[("acme", "high")]
    # TTFTs 0.1, 0.2, 0.8 (a4, a5 have none): p50 the middle, p99 98% of the way from 0.2 to 0.8.
    assert high["ttft_p50_s"] == pytest.approx(0.2)
    assert high["ttft_p99_s"] == pytest.approx(0.2 + 0.98 * 0.6)
    assert high["tpot_p50_s"] == pytest.approx(0.03)
    # e2e over completed requests only: a1 0.1 + 4 * 0.02, a2 0.8 + 5 * 0.03, a3 0.2 + 6 * 0.09.
    assert high["e2e_p50_s"] == pytest.approx(0.2 + 6 * 0.09)
    low = by_group(usage_report(ledger_path))[("acme", "low")]
    assert (low["tpot_p50_s"], low["tpot_p99_s"]) == (pytest.approx(0.1), pytest.approx(0.1))  # a7: 1 token


def test_the_window_is_by_finish_time_since_inclusive_until_exclusive(ledger_path):
    a2_finish = ROWS[1].finish_time
    report = usage_report(ledger_path, since=a2_finish, until=ROWS[5].finish_time)
    assert [(g["tenant"], g["tier"], g["requests"]) for g in report] == [("acme", "high", 4)]
    assert usage_report(ledger_path, tenant="beta")[0]["requests"] == 1
    assert usage_report(ledger_path, since=T0 + 3600) == []


def test_times_are_epoch_seconds_or_iso_8601_utc_by_default():
    assert parse_time("1764547200.5") == T0 + 0.5
    assert parse_time("2025-12-01T00:00:00Z") == T0
    assert parse_time("2025-12-01T01:00:00+01:00") == T0
    assert parse_time("2025-12-01") == T0
    with pytest.raises(ValueError, match="time 'yesterday' is neither epoch seconds.*nor ISO 8601"):
        parse_time("yesterday")


def test_load_gives_a_dataframe_of_the_window(ledger_path):
    frame = load(ledger_path, since=ROWS[5].arrival_time)
    assert list(frame["request_id"]) == ["a6", "a7", "b1"]
    assert list(frame["tpot_met"]) == [True, pytest_na(), False]
    assert frame["completion_tokens"].sum() == 3 + 1 + 4


def pytest_na():
    import pandas as pd

    return pd.NA


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli_main(["usage", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_carries_the_report_and_its_window(ledger_path, capsys):
    code, out, _ = run_cli(capsys, "--db", str(ledger_path), "--json", "--since", "2025-12-01T00:00:00Z")
    assert code == 0
    doc = json.loads(out)
    assert (doc["since"], doc["until"], doc["tenant"]) == (T0, None, None)
    assert doc["groups"] == usage_report(ledger_path)


def test_cli_csv_has_one_line_per_tenant_and_tier(ledger_path, capsys):
    code, out, _ = run_cli(capsys, "--db", str(ledger_path), "--csv", "--tenant", "acme")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["tier"], r["requests"], r["slo_attainment"], r["missed_error"]) for r in rows] == \
        [("high", "5", "0.25", "1"), ("low", "2", "1.0", "0")]


def test_cli_requests_lists_rows_in_finish_order(ledger_path, capsys):
    code, out, _ = run_cli(capsys, "--db", str(ledger_path), "--requests", "--json", "--tenant", "acme")
    assert code == 0
    listed = json.loads(out)["requests"]
    assert [r["request_id"] for r in listed] == ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]
    assert (listed[3]["status"], listed[3]["server_error"], listed[6]["tpot_met"]) == ("INTERNAL", True, None)
    code, out, _ = run_cli(capsys, "--db", str(ledger_path), "--requests", "--csv")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == len(ROWS)


def test_cli_table_shows_attainment_of_the_judged(ledger_path, capsys):
    code, out, _ = run_cli(capsys, "--db", str(ledger_path))
    assert code == 0
    acme_high = next(line for line in out.splitlines() if "acme" in line and "high" in line)
    assert "25.0% of 4" in acme_high and "1/1/1" in acme_high and "150 (4)" in acme_high
    assert "740 / 946" in acme_high  # the last column, whole: off a terminal the table is not cut at 80


def test_cli_refuses_a_missing_ledger_and_a_bad_time(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--db", str(tmp_path / "none.db"))
    assert code == 2 and f"usage ledger {tmp_path / 'none.db'} does not exist" in err
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "--db", str(tmp_path / "none.db"), "--since", "last week")
    assert exit_.value.code == 2 and "time 'last week' is neither" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "--db", str(tmp_path / "x.db"), "--since", "20", "--until", "10")
    assert code == 2 and "--until 10.0 is not after --since 20.0" in err


def test_the_installed_command_line_reports_a_ledger(ledger_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "nitsum_jax.cli", "usage", "--db", str(ledger_path), "--csv"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert [r["tenant"] for r in csv.DictReader(io.StringIO(out))] == ["acme", "acme", "beta"]
