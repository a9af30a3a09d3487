"""The usage ledger's file and writer: schema and migration, permissions, refusal of files that
are not a ledger, dropped rows, flushing, a SIGKILL mid-load, reading while a writer runs."""

import logging
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from nitsum_jax.usage import (SCHEMA_VERSION, LedgerError, UsageLedger, UsageRow, load, open_ro, open_rw,
                              usage_report)
from nitsum_jax.usage.schema import MIGRATIONS

REPO = pathlib.Path(__file__).resolve().parents[1]


def a_row(i: int, tenant: str = "acme", tier: str = "high") -> UsageRow:
    arrival = 1_764_547_200.0 + 0.37 * i
    return UsageRow(request_id=f"req-{i}", tenant=tenant, tier=tier, api="grpc" if i % 2 else "http",
                    plan="mixed", lane="tp1@0", tp=1, moved=i % 5 == 0, arrival_time=arrival,
                    first_token_time=arrival + 0.05, finish_time=arrival + 0.45, prompt_tokens=7 + i % 13,
                    cached_tokens=i % 3, completion_tokens=9, finish_reason="length", status="OK", ttft_s=0.05,
                    tpot_s=0.05, ttft_target_s=0.5, tpot_target_s=0.06, ttft_met=True, tpot_met=True,
                    server_error=False)


def ids_in(path) -> list[str]:
    conn = open_ro(path)
    try:
        return [r[0] for r in conn.execute("SELECT request_id FROM requests ORDER BY rowid")]
    finally:
        conn.close()


def test_a_new_ledger_is_owner_only_in_wal_mode_at_the_current_schema(tmp_path):
    path = tmp_path / "usage.db"
    ledger = UsageLedger(path)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        ledger.record(a_row(1))
        ledger.close()
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
        conn.close()
    finally:
        ledger.close()


def test_the_wal_file_of_a_ledger_being_written_is_owner_only_too(tmp_path):
    path = tmp_path / "usage.db"
    committed = threading.Event()
    with UsageLedger(path, batch_rows=1, on_commit=lambda *_: committed.set()) as ledger:
        ledger.record(a_row(1))
        assert committed.wait(10)
        assert os.stat(f"{path}-wal").st_mode & 0o777 == 0o600


def test_a_v1_ledger_is_migrated_on_open_and_keeps_its_rows(tmp_path):
    path = tmp_path / "usage.db"
    conn = open_rw(path, migrations=MIGRATIONS[:1])
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.execute("INSERT INTO requests (request_id, tenant, tier, api, arrival_time, finish_time, prompt_tokens, "
                 "completion_tokens, status, ttft_s, ttft_met, server_error) "
                 "VALUES ('old-1', 'acme', 'low', 'grpc', 100.0, 101.5, 12, 4, 'OK', 0.25, 1, 0)")
    conn.close()
    with pytest.raises(LedgerError, match=r"schema v1, older than v2.*migrate"):
        open_ro(path)
    with UsageLedger(path) as ledger:
        ledger.record(a_row(2))
    rows = load(path)
    assert list(rows["request_id"]) == ["old-1", "req-2"]
    old = rows.iloc[0]
    assert (old["prompt_tokens"], old["cached_tokens"], old["completion_tokens"]) == (12, 0, 4)
    assert old["moved"] is pd_na() and old["ttft_met"]
    assert rows.iloc[1]["cached_tokens"] == a_row(2).cached_tokens
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def pd_na():
    import pandas as pd

    return pd.NA


def test_a_ledger_of_a_newer_schema_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "usage.db"
    UsageLedger(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match=rf"{path}.*v{SCHEMA_VERSION + 1}, newer.*v{SCHEMA_VERSION}"):
        UsageLedger(path)


def test_a_file_that_is_not_sqlite_is_refused_naming_it(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"tenant,tier\nacme,high\n" * 200)
    for opener in (UsageLedger, open_ro):
        with pytest.raises(LedgerError, match=rf"usage ledger {path} cannot be read as an SQLite database"):
            opener(path)
    assert path.read_bytes() == b"tenant,tier\nacme,high\n" * 200  # left as it was


def test_another_applications_sqlite_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO orders (total) VALUES (9.5)")
    conn.commit()
    conn.close()
    for opener in (UsageLedger, open_ro):
        with pytest.raises(LedgerError, match=rf"{path} is an SQLite database but not a nitsum-jax usage ledger"):
            opener(path)
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["orders"]
    conn.close()


def test_a_damaged_ledger_is_refused_when_opened_for_writing(tmp_path):
    path = tmp_path / "usage.db"
    with UsageLedger(path, batch_rows=500) as ledger:
        for i in range(2000):
            ledger.record(a_row(i))
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page:3 * page] = os.urandom(page)  # a table page past the header
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match=rf"usage ledger {path} (is damaged|cannot be read)"):
        UsageLedger(path)


def test_opening_a_missing_ledger_to_read_names_it(tmp_path):
    with pytest.raises(LedgerError, match=rf"usage ledger {tmp_path / 'none.db'} does not exist"):
        open_ro(tmp_path / "none.db")


@pytest.mark.parametrize("kwargs, message", [({"batch_rows": 0}, "batch_rows 0 must be at least 1"),
                                             ({"max_queue": 0}, "max_queue 0 must be at least 1"),
                                             ({"flush_s": 0.0}, "flush_s 0.0 must be > 0")])
def test_bad_writer_settings_are_refused_by_name(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        UsageLedger(tmp_path / "usage.db", **kwargs)


def test_a_full_queue_drops_rows_counts_them_and_logs_without_blocking(tmp_path, caplog):
    path = tmp_path / "usage.db"
    writing, release = threading.Event(), threading.Event()

    def hold_writer(batch_id, rows):  # the writer sits here, as if the disk were slow
        writing.set()
        assert release.wait(30)

    ledger = UsageLedger(path, batch_rows=1, max_queue=2, on_commit=hold_writer)
    try:
        assert ledger.record(a_row(0))
        assert writing.wait(10)  # row 0 committed; the writer is held and the queue is empty
        assert ledger.record(a_row(1)) and ledger.record(a_row(2))  # the queue's two places
        with caplog.at_level(logging.WARNING, logger="nitsum_jax.usage.ledger"):
            assert not ledger.record(a_row(3))
            assert not ledger.record(a_row(4))
        assert ledger.dropped == 2
        assert ledger.registry.get_sample_value("nitsum_usage_rows_dropped_total") == 2
        assert "queue full, row of request req-3 dropped" in caplog.text
    finally:
        release.set()
        ledger.close()
    assert ids_in(path) == ["req-0", "req-1", "req-2"]
    assert ledger.written == 3 and ledger.registry.get_sample_value("nitsum_usage_rows_written_total") == 3


def test_counters_can_go_on_the_servers_registry(tmp_path):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    with UsageLedger(tmp_path / "usage.db", registry=registry) as ledger:
        ledger.record(a_row(1))
    assert registry.get_sample_value("nitsum_usage_rows_written_total") == 1
    assert registry.get_sample_value("nitsum_usage_rows_dropped_total") == 0


def test_close_writes_the_rows_still_waiting_for_their_batch(tmp_path):
    path = tmp_path / "usage.db"
    ledger = UsageLedger(path, batch_rows=10_000, flush_s=3600.0)  # no batch would fill or time out
    for i in range(37):
        ledger.record(a_row(i))
    ledger.close()
    assert ids_in(path) == [f"req-{i}" for i in range(37)]


def test_a_row_recorded_after_close_is_dropped_and_counted(tmp_path):
    ledger = UsageLedger(tmp_path / "usage.db")
    ledger.close()
    assert not ledger.record(a_row(1))
    assert ledger.dropped == 1


def test_reports_read_a_ledger_while_its_writer_is_open(tmp_path):
    path = tmp_path / "usage.db"
    batches: list[int] = []
    committed = threading.Condition()

    def on_commit(batch_id, rows):
        with committed:
            batches.append(batch_id)
            committed.notify_all()

    with UsageLedger(path, batch_rows=5, on_commit=on_commit) as ledger:
        for i in range(5):
            ledger.record(a_row(i))
        with committed:
            assert committed.wait_for(lambda: len(batches) == 1, 10)
        assert usage_report(path)[0]["requests"] == 5
        for i in range(5, 10):
            ledger.record(a_row(i, tenant="beta"))
        with committed:
            assert committed.wait_for(lambda: len(batches) == 2, 10)
        assert [(g["tenant"], g["requests"]) for g in usage_report(path)] == [("acme", 5), ("beta", 5)]
        assert len(load(path)) == 10


CRASH_WRITER = """
    import sys
    from nitsum_jax.usage import UsageLedger
    from test_usage_ledger import a_row

    def on_commit(batch_id, rows):  # after the commit: these rows are durable
        print(batch_id, *(r.request_id for r in rows), flush=True)

    ledger = UsageLedger(sys.argv[1], batch_rows=40, flush_s=0.02, max_queue=400, on_commit=on_commit)
    i = 0
    while True:  # load until killed; a full queue drops rows, which is allowed
        ledger.record(a_row(i))
        i += 1
"""


@pytest.mark.timeout(120)
def test_a_sigkill_mid_load_loses_no_committed_batch(tmp_path):
    path, script = tmp_path / "usage.db", tmp_path / "writer.py"
    script.write_text(textwrap.dedent(CRASH_WRITER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env)
    committed: list[str] = []
    try:
        for line in proc.stdout:
            batch_id, *ids = line.split()
            committed += ids
            if int(batch_id) == 30:
                break
        proc.send_signal(signal.SIGKILL)
        # Lines printed before the kill; one cut off by it is not counted (its batch is the lost one).
        committed += [i for line in proc.stdout if line.endswith("\n") for i in line.split()[1:]]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    UsageLedger(path).close()  # opens cleanly: integrity checked, nothing to repair by hand
    stored = ids_in(path)
    assert len(stored) == len(set(stored))
    assert set(committed) <= set(stored)
    # Beyond what was reported, at most the one batch committed between its commit and its print.
    assert len(stored) - len(committed) <= 40
