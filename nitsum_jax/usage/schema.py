"""The ledger file: its table, its schema versions and how a connection to it is opened.

One table, `requests`, one row per finished request. The schema version lives in SQLite's
`PRAGMA user_version` and the file is marked as a nitsum-jax ledger by `PRAGMA
application_id`, so a foreign SQLite file is refused instead of being written into.
Opening read-write applies the pending migrations in one transaction; a read-only
connection (the `usage` report, while the server writes) never changes the file.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3

APPLICATION_ID = 0x4E4A5553  # "NJUS": this file is a nitsum-jax usage ledger
BUSY_TIMEOUT_MS = 5000  # a reader checkpointing the WAL can hold the write lock briefly

# MIGRATIONS[i] takes the file from version i to version i + 1; the current version is their count.
MIGRATIONS: tuple[str, ...] = (
    # v1: the request record.
    """
    CREATE TABLE requests (
        request_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        tier TEXT NOT NULL,
        api TEXT NOT NULL CHECK (api IN ('grpc', 'http')),
        plan TEXT,
        lane TEXT,
        tp INTEGER,
        arrival_time REAL NOT NULL,
        first_token_time REAL,
        finish_time REAL NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        finish_reason TEXT,
        status TEXT NOT NULL,
        ttft_s REAL,
        tpot_s REAL,
        ttft_met INTEGER,
        tpot_met INTEGER,
        server_error INTEGER NOT NULL
    );
    CREATE INDEX requests_by_finish ON requests (finish_time);
    """,
    # v2: prompt tokens served from a prefix cache, whether the request moved between lanes, and
    # the targets each verdict was taken against (tier targets change with configuration).
    """
    ALTER TABLE requests ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE requests ADD COLUMN moved INTEGER;
    ALTER TABLE requests ADD COLUMN ttft_target_s REAL;
    ALTER TABLE requests ADD COLUMN tpot_target_s REAL;
    CREATE INDEX requests_by_tenant ON requests (tenant, tier, finish_time);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# The columns of the current version, in the order rows are written.
COLUMNS: tuple[str, ...] = (
    "request_id", "tenant", "tier", "api", "plan", "lane", "tp", "moved",
    "arrival_time", "first_token_time", "finish_time",
    "prompt_tokens", "cached_tokens", "completion_tokens", "finish_reason", "status",
    "ttft_s", "tpot_s", "ttft_target_s", "tpot_target_s", "ttft_met", "tpot_met", "server_error",
)
INSERT_SQL = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class LedgerError(Exception):
    """The ledger file cannot be used (missing, corrupt, foreign or too new); names the file."""


def open_rw(path: str | os.PathLike, migrations: tuple[str, ...] = MIGRATIONS) -> sqlite3.Connection:
    """A read-write connection in WAL mode, the schema migrated to `len(migrations)`.

    A new file is created owner-only (0600) before SQLite touches it; SQLite gives its -wal and
    -shm files the same mode. The connection may be handed to one other thread (the writer)."""
    path = pathlib.Path(path)
    if not path.exists():
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass  # another process made it first: it is then theirs to have created
        except OSError as e:
            raise LedgerError(f"cannot create usage ledger {path}: {e.strerror}") from e
    conn = _connect(path, lambda: sqlite3.connect(path, isolation_level=None, check_same_thread=False))
    try:
        with _named_errors(path):
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _check_identity(conn, path, len(migrations), empty_ok=True)
            _check_intact(conn, path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a commit survives a process crash
            _migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def open_ro(path: str | os.PathLike) -> sqlite3.Connection:
    """A read-only connection to an existing ledger of the current version (readers never block
    the writer in WAL mode, nor it them)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise LedgerError(f"usage ledger {path} does not exist")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = _connect(path, lambda: sqlite3.connect(uri, uri=True, check_same_thread=False))
    try:
        with _named_errors(path):
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _check_identity(conn, path, SCHEMA_VERSION, empty_ok=False)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                raise LedgerError(f"usage ledger {path} has schema v{version}, older than v{SCHEMA_VERSION}: open "
                                  f"it once read-write (`serve --usage-db` or UsageLedger) to migrate it")
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(path: pathlib.Path, connect) -> sqlite3.Connection:
    with _named_errors(path):
        return connect()


class _named_errors:
    """Turns sqlite3's errors ("file is not a database", "database disk image is malformed")
    into a LedgerError that names the file."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, _tb):
        if kind is not None and issubclass(kind, sqlite3.Error):
            raise LedgerError(f"usage ledger {self.path} cannot be read as an SQLite database: {error}") from error
        return False


def _check_identity(conn: sqlite3.Connection, path: pathlib.Path, newest: int, *, empty_ok: bool) -> None:
    """Refuses a file that is not ours: another application's SQLite database, or a ledger
    written by a newer nitsum-jax. An empty file (just created) passes if `empty_ok`."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id == 0 and version == 0 and tables == 0:
        if empty_ok:
            return
        raise LedgerError(f"usage ledger {path} is empty (no schema): nothing has been recorded in it")
    if app_id != APPLICATION_ID:
        raise LedgerError(f"{path} is an SQLite database but not a nitsum-jax usage ledger "
                          f"(application_id {app_id:#x}, expected {APPLICATION_ID:#x})")
    if version > newest:
        raise LedgerError(f"usage ledger {path} has schema v{version}, newer than this nitsum-jax "
                          f"understands (v{newest}): upgrade nitsum-jax to read it")


def _check_intact(conn: sqlite3.Connection, path: pathlib.Path) -> None:
    """A damaged file is refused when the server starts, not found out by a failing commit later
    (quick_check reads every page once: linear in the file, no index cross-checks)."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        raise LedgerError(f"usage ledger {path} is damaged: {'; '.join(problems)}")


def _migrate(conn: sqlite3.Connection, migrations: tuple[str, ...]) -> None:
    """Applies the migrations past the file's version, all in one transaction."""
    conn.execute("BEGIN IMMEDIATE")  # one process migrates; another opening at once waits, then sees it done
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in migrations[version:]:
            for statement in (s.strip() for s in step.split(";")):
                if statement:
                    conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {len(migrations)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
