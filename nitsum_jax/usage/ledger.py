"""`UsageLedger`: rows recorded from serving threads, written in batches by one writer thread.

`record(row)` only puts the row on a bounded queue: it never blocks and never raises into
the serving path. A full queue (the disk cannot keep up) drops the row, counts it
(`dropped`, the `nitsum_usage_rows_dropped` counter) and logs it. The writer commits up to
`batch_rows` rows per transaction, or what arrived within `flush_s` of a batch's first
row. A crash of the process loses only rows not yet committed: the batch being written and
the rows queued behind it (at a steady load, about `flush_s` seconds of requests).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter

from nitsum_jax.usage.rows import UsageRow, wall_offset
from nitsum_jax.usage.schema import INSERT_SQL, open_rw

_log = logging.getLogger(__name__)
_DROP_LOG_EVERY_S = 10.0  # under a flood of drops, one log line per this many seconds
_CLOSE = object()  # the queue's last item: flush and stop


class UsageLedger:
    def __init__(self, path: str | os.PathLike, *, batch_rows: int = 256, flush_s: float = 1.0,
                 max_queue: int = 10_000, registry: CollectorRegistry | None = None,
                 on_commit: Callable[[int, list[UsageRow]], None] | None = None):
        """Opens (creating 0600, migrating) the ledger at `path`; raises LedgerError if it is not one.

        `registry`: where the counters go (the server's metrics registry; default: a registry of
        the ledger's own, `self.registry`). `on_commit(batch_id, rows)`: called on the writer
        thread after each commit (batch ids count from 1); it must be quick."""
        for name, value, low in (("batch_rows", batch_rows, 1), ("max_queue", max_queue, 1)):
            if value < low:
                raise ValueError(f"{name} {value} must be at least {low}")
        if not flush_s > 0:
            raise ValueError(f"flush_s {flush_s} must be > 0")
        self.path, self.batch_rows, self.flush_s = path, batch_rows, flush_s
        self.wall_offset = wall_offset()  # what `row_from_handle` needs: one offset for the server's life
        self._conn = open_rw(path)
        self.registry = registry or CollectorRegistry()
        self._dropped = Counter("nitsum_usage_rows_dropped",
                                "Usage rows not written: the queue was full, the ledger closed or a write failed",
                                registry=self.registry)
        self._written = Counter("nitsum_usage_rows_written", "Usage rows committed to the ledger",
                                registry=self.registry)
        self.dropped = 0
        self.written = 0
        self._on_commit = on_commit
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._closed = False
        self._lock = threading.Lock()
        self._last_drop_log = -_DROP_LOG_EVERY_S
        self._batch_ids = itertools.count(1)
        self._writer = threading.Thread(target=self._write_loop, name="nitsum-usage-writer", daemon=True)
        self._writer.start()

    def record(self, row: UsageRow) -> bool:
        """Queues the row for the writer; False (row dropped, counted, logged) if the queue is full
        or the ledger is closed."""
        with self._lock:  # held only around put_nowait: `close` then cannot slip its marker in between
            if not self._closed:
                try:
                    self._queue.put_nowait(row)
                    return True
                except queue.Full:
                    pass
            self._count_drop(row, "closed" if self._closed else "queue full")
        return False

    def close(self, timeout: float | None = None) -> None:
        """Writes what is queued, then stops the writer and closes the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_CLOSE)  # waits for room: the writer is draining the queue
        self._writer.join(timeout)
        if self._writer.is_alive():
            _log.error("usage ledger %s: writer still busy after %ss; rows queued may be lost", self.path, timeout)
            return
        self._conn.close()

    def __enter__(self) -> "UsageLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count_drop(self, row: UsageRow, why: str) -> None:
        """(Under `_lock`.)"""
        self.dropped += 1
        self._dropped.inc()
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_EVERY_S:
            self._last_drop_log = now
            _log.warning("usage ledger %s: %s, row of request %s dropped (%d dropped so far)",
                         self.path, why, row.request_id, self.dropped)

    def _write_loop(self) -> None:
        done = False
        while not done:
            batch, done = self._next_batch()
            if batch:
                self._commit(batch)

    def _next_batch(self) -> tuple[list[UsageRow], bool]:
        """Waits for a row, then gathers up to `batch_rows` within `flush_s`; (rows, closing)."""
        first = self._queue.get()
        if first is _CLOSE:
            return [], True
        batch, deadline = [first], time.monotonic() + self.flush_s
        while len(batch) < self.batch_rows:
            try:
                row = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if row is _CLOSE:
                return batch, True
            batch.append(row)
        return batch, False

    def _commit(self, batch: list[UsageRow]) -> None:
        try:
            self._conn.execute("BEGIN")  # one transaction: the whole batch or none of it
            self._conn.executemany(INSERT_SQL, [row.values() for row in batch])
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            _log.exception("usage ledger %s: a batch of %d rows could not be written", self.path, len(batch))
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            with self._lock:
                self.dropped += len(batch)
                self._dropped.inc(len(batch))
            return
        self.written += len(batch)
        self._written.inc(len(batch))
        if self._on_commit is not None:
            try:
                self._on_commit(next(self._batch_ids), batch)
            except Exception:  # noqa: BLE001 - a faulty callback must not stop the writer
                _log.exception("usage ledger %s: on_commit failed", self.path)
