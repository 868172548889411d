"""The SQLite store's maintenance (export, verify, import, prune, check): receipts listed
in pages and imported in batches, never holding a read snapshot or the write lock for
longer than one of them; a mixin of :class:`.sqlite.SQLiteStore`."""

from __future__ import annotations

import abc
import contextlib
import itertools
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..models import Receipt, receipt_row
from ._connections import Connections
from ._locks import KeyLocks
from ._sqlite_operation import operation
from ._sqlite_schema import (
    FINGERPRINT_COLUMN,
    RECEIPT_COLUMNS,
    RECEIPT_VALUES,
    SEEN_SECONDS,
    TOOL_COLUMN,
    TOOL_INDEX,
    ensure_seen_table,
)
from .base import Admin


class SQLiteAdmin(Admin):
    """The admin part of :class:`.sqlite.SQLiteStore`, which provides the file, its
    connections and its transactions."""

    path: Path
    url: str
    _conns: Connections
    _locks: KeyLocks | None

    @abc.abstractmethod
    def _conn(self) -> sqlite3.Connection: ...

    @abc.abstractmethod
    def _write(
        self, conn: sqlite3.Connection | None = None
    ) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

    # -- maintenance ----------------------------------------------------------------

    def iter_receipts(self) -> Iterator[Receipt]:
        # Streamed in pages of BATCH, each read by a statement of its own that is done
        # before anything is yielded: no read snapshot outlives a page (WAL checkpoints,
        # prune's included, are never held back by a slow consumer), and no operation is
        # in flight between pages (a fork or close() meanwhile waits for nothing).
        self._ensure_tool_index()
        # A row whose tool name or fingerprint is NULL (edited in) compares as neither
        # before nor after a key: such rows come first, on a page of their own.
        yield from (Receipt(*row) for row in self._receipts_page(None))
        after: tuple[object, ...] = ()
        while True:
            rows = self._receipts_page(after)
            yield from (Receipt(*row) for row in rows)
            if len(rows) < _batch():
                return
            after = (rows[-1][TOOL_COLUMN], rows[-1][FINGERPRINT_COLUMN])

    @operation
    def _receipts_page(self, after: tuple[object, ...] | None) -> list[Any]:
        """The rows with a NULL key for ``None``, else the next page of the others after
        ``after`` (``()``: the first page)."""
        select = f"SELECT {RECEIPT_COLUMNS} FROM receipts WHERE "
        order = " ORDER BY tool_name, fingerprint"
        conn = self._conn()
        if after is None:
            return conn.execute(f"{select}tool_name IS NULL OR fingerprint IS NULL{order}"
                                ).fetchall()
        keyed = "tool_name IS NOT NULL AND fingerprint IS NOT NULL"
        if not after:
            return conn.execute(f"{select}{keyed}{order} LIMIT {_batch()}").fetchall()
        return conn.execute(f"{select}{keyed} AND (tool_name, fingerprint) > (?, ?)"
                            f"{order} LIMIT {_batch()}", after).fetchall()

    @operation
    def _ensure_tool_index(self) -> None:
        # Pages in (tool_name, fingerprint) order, each found in log time. Stores made
        # before the index get it on their first listing (one write, once).
        conn = self._conn()
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = "
                        "'receipts_by_tool'").fetchone() is None:
            with self._write(conn):
                conn.execute(TOOL_INDEX)

    @operation
    def import_receipt(self, receipt: Receipt) -> None:
        with self._write() as conn:
            conn.execute(f"INSERT OR REPLACE INTO receipts ({RECEIPT_COLUMNS}) VALUES "
                         f"({RECEIPT_VALUES})", receipt_row(receipt))

    def import_receipts(self, receipts: Iterable[Receipt]) -> int:
        # One transaction per BATCH: the write lock is held for a page at a time, never
        # while the caller's iterable runs (it may parse, check and print).
        count = 0
        for batch in _batches(receipts):
            self._import_batch(batch)
            count += len(batch)
        return count

    @operation
    def _import_batch(self, batch: list[Receipt]) -> None:
        with self._write() as conn:
            conn.executemany(f"INSERT OR REPLACE INTO receipts ({RECEIPT_COLUMNS}) VALUES "
                             f"({RECEIPT_VALUES})", [receipt_row(r) for r in batch])

    @operation
    def prune(self, now: float) -> dict[str, int]:
        # First: a lock directory that is not ours is refused before anything is deleted.
        lock_files = 0 if self._locks is None else self._locks.prune()
        before = self.bytes_on_disk()
        with self._write() as conn:
            receipts = conn.execute("DELETE FROM receipts WHERE expires_at <= ?", (now,)).rowcount
            # Finished leases leave no row; what is left is failed ones (for last_failure)
            # and held ones. A held lease may belong to a live holder whose heartbeat lags:
            # only drop those whose holder has been silent for an hour.
            leases = conn.execute("DELETE FROM leases WHERE state != 'held' OR expires_at <= ?",
                                  (now - 3600,)).rowcount
            ensure_seen_table(conn)
            conn.execute("DELETE FROM seen WHERE at <= ?", (now - SEEN_SECONDS,))
        conn = self._conn()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        conn.execute("VACUUM")
        # VACUUM wrote the shrunk file to the WAL: only a complete checkpoint moves it into
        # the file and truncates both. One held back by a reader (past the busy timeout)
        # leaves them as they are, and the sizes below say so.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return {"receipts": receipts, "leases": leases, "lock_files": lock_files,
                "bytes_before": before, "bytes_after": self.bytes_on_disk()}

    def bytes_on_disk(self) -> int:
        """The store's size on disk now: the file and its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    @operation
    def check(self) -> list[str]:
        rows = self._conn().execute("PRAGMA quick_check").fetchall()
        return [] if rows == [("ok",)] else [f"{self.path}: {' '.join(str(row[0]).split())}"
                                             for row in rows]


def _batches(items: Iterable[Receipt]) -> Iterator[list[Receipt]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, _batch())):
        yield batch


def _batch() -> int:
    # BATCH of the store's module, read at each use: the setting lives there (and tests
    # lower it there).
    from . import sqlite

    return sqlite.BATCH
