"""The embedded store: one SQLite file (WAL) shared by every process on the machine.

Leases live in the database (fencing tokens from one global counter, so they only
grow even after ``prune``). Beside them, the holder keeps a lock on a per-key lock file
for as long as it executes (:mod:`._locks`): waiters in other processes are woken the
moment the holder finishes and also when it dies. On a platform with no such lock
(:mod:`._liveness`), a held lease is live until it expires, and waiters poll it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from .._platform import O_CLOEXEC
from ..models import RECEIPT_FIELDS, Receipt, StoreError, receipt_row
from ..signing import key_path_for
from ._connections import Connections, not_utf8
from ._liveness import POLL_SECONDS, LivenessLock, platform_lock
from ._locks import KeyLocks
from .base import Busy, Failure, Lease, ReceiptStore, load_counters, translating

P = ParamSpec("P")
R = TypeVar("R")

SCHEMA_VERSION = 1
_RECEIPT_COLUMNS = ", ".join(RECEIPT_FIELDS)  # one column per field, in the receipt's order
_RECEIPT_VALUES = ", ".join("?" * len(RECEIPT_FIELDS))
_TOOL_COLUMN, _FINGERPRINT_COLUMN = RECEIPT_FIELDS.index("tool_name"), RECEIPT_FIELDS.index("fingerprint")
# The order of iter_receipts (export, verify), paged through by key.
_TOOL_INDEX = "CREATE INDEX IF NOT EXISTS receipts_by_tool ON receipts (tool_name, fingerprint)"
BATCH = 1000  # receipts per page of iter_receipts and per transaction of import_receipts
_SCHEMA = f"""
CREATE TABLE receipts ({_RECEIPT_COLUMNS.replace("fingerprint,", "fingerprint TEXT PRIMARY KEY,", 1)});
CREATE INDEX receipts_by_expiry ON receipts (expires_at);
{_TOOL_INDEX};
CREATE TABLE leases (
    fingerprint TEXT PRIMARY KEY, token INTEGER NOT NULL, owner TEXT NOT NULL,
    state TEXT NOT NULL, expires_at REAL NOT NULL, error_type TEXT, error_message TEXT
);
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('token', 0);
CREATE TABLE stats (
    run_id TEXT NOT NULL, process_id TEXT NOT NULL, tool_name TEXT NOT NULL,
    counters TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, process_id, tool_name)
);
"""

_translated = translating(sqlite3.Error, OSError)


def _operation(method: Callable[Concatenate[SQLiteStore, P], R]) -> Callable[Concatenate[SQLiteStore, P], R]:
    """A store operation: its errors as StoreError, and no fork while it runs (see
    :mod:`._connections`)."""

    @functools.wraps(method)
    def wrapper(self: SQLiteStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        # translating() inlined: this wraps every warm hit
        conns = self._conns
        conns.enter()
        try:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not not_utf8(exc):
                    raise
            with conns.leniently():  # a damaged row: read again, tolerating it
                return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"store {self.url}: {exc}") from exc
        finally:
            conns.leave()

    return wrapper


class SQLiteStore(ReceiptStore):
    """A :class:`ReceiptStore` in one SQLite file; see the module docstring."""

    reads_locally = True  # WAL: a reader never waits for a writer

    def __init__(self, path: str | os.PathLike[str], lock: LivenessLock | None = None) -> None:
        self.path = Path(path).expanduser().absolute()
        self.url = str(self.path)
        self._conns = Connections(self.path)
        self._open_file()
        self.identity = f"sqlite:{os.path.realpath(self.path)}"
        self.key_path = key_path_for(self.path)
        self._has_seen = False  # the table of mode "off", made once per store and process
        lock = lock or platform_lock()
        self._locks = None if lock is None else \
            KeyLocks(self.path.with_name(self.path.name + ".locks"), lock)

    # -- connection and schema ------------------------------------------------------

    def _open_file(self) -> None:
        if self.path.is_dir():
            raise StoreError(f"store path {self.path} is a directory; pass a file path like "
                             f"{self.path / 'receipts.db'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot open store {self.path}: {exc.strerror}; check the path "
                             f"and its permissions") from None
        self._conns.enter()  # an operation: a fork meanwhile waits for it
        try:
            self._ensure_schema(self._conn())
        except (sqlite3.DatabaseError, StoreError) as exc:
            error: Exception = exc
        else:
            return
        finally:
            self._conns.leave()
        self._conns.close_all()
        if isinstance(error, StoreError):
            raise error
        raise StoreError(f"{self.path} is not a usable singleflight store ({error}); move it "
                         f"away or pass another --db") from None

    def _conn(self) -> sqlite3.Connection:
        return self._conns.get()

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            with self._write(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                        raise StoreError(f"{self.path} is an SQLite database of another "
                                         f"program, not a singleflight store; pass another --db")
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    version = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer singleflight-agents (schema "
                             f"{version} > {SCHEMA_VERSION}); upgrade the package or pass another --db")
        self._use_wal(conn)

    @staticmethod
    def _use_wal(conn: sqlite3.Connection) -> None:
        # Switching a fresh file to WAL does not wait on the busy timeout: when several
        # processes open a new store at once, retry until one of them has switched it.
        deadline = time.monotonic() + 60
        while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        conn = conn or self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._conns.local.receipts = {}  # our own commits do not move data_version

    # -- receipts and leases --------------------------------------------------------

    @_operation
    def get(self, key: str) -> Receipt | None:
        # Receipts this thread read stay valid until the file changes: data_version moves
        # on every commit by another connection (ours clear the memo in _write), and is
        # cheaper than reading the row again. A hit therefore costs one pragma.
        conn, local = self._conn(), self._conns.local
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        receipts: dict[str, Receipt] = local.receipts
        if version != local.data_version:
            receipts.clear()
            local.data_version = version
        receipt = receipts.get(key)
        if receipt is None:
            row = conn.execute(
                f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE fingerprint = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            if len(receipts) >= 4096:
                del receipts[next(iter(receipts))]  # the oldest
            receipt = receipts[key] = Receipt(*row)
        return receipt

    @_operation
    def acquire(self, key: str, owner: str, lease_seconds: float) -> Lease | Busy:
        fd = None
        if self._locks is not None:
            fd = self._locks.try_lock(key)
            if fd is None:
                return self._busy(key)
        try:
            with self._write() as conn:
                row = conn.execute("SELECT state, token, expires_at FROM leases WHERE "
                                   "fingerprint = ?", (key,)).fetchone()
                held = row is not None and row[0] == "held"
                # Holding the lock file, a lease still marked held has a dead holder; with
                # no lock file, a held lease is live until it expires.
                if held and fd is None and row[2] > time.time():
                    return Busy(since_token=row[1])
                token = conn.execute(
                    "UPDATE meta SET value = value + 1 WHERE name = 'token' RETURNING value"
                ).fetchone()[0]
                conn.execute(
                    "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, 'held', ?, NULL, NULL)",
                    (key, token, owner, time.time() + lease_seconds),
                )
        except BaseException:
            if self._locks is not None and fd is not None:
                self._locks.unlock(key, fd)
            raise
        return Lease(key, token, owner, lease_seconds, held, fd)

    def _busy(self, key: str) -> Busy:
        # A lease that ended normally leaves no row (put and release delete it), and a
        # failed one is replaced by the next acquire: with no row, no failure is recorded
        # now, and any found later is a newer holder's (its token comes from the counter),
        # so since_token 0 is as right as "the last finished token + 1" was.
        row = self._conn().execute(
            "SELECT token, state FROM leases WHERE fingerprint = ?", (key,)).fetchone()
        return Busy(since_token=0 if row is None else row[0] if row[1] == "held" else row[0] + 1)

    @_operation
    def renew(self, lease: Lease) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE leases SET expires_at = ? WHERE fingerprint = ? AND token = ? "
                "AND state = 'held'", (time.time() + lease.lease_seconds, lease.key, lease.token))
        return cursor.rowcount == 1

    def _finish(self, lease: Lease) -> None:
        if self._locks is not None and lease.handle is not None:
            self._locks.unlock(lease.key, lease.handle)
            lease.handle = None

    @_operation
    def release(self, lease: Lease, failure: tuple[str, str] | None = None) -> None:
        try:
            with self._write() as conn:
                if failure is None:  # ended normally: no row is kept (see _busy)
                    conn.execute("DELETE FROM leases WHERE fingerprint = ? AND token = ?",
                                 (lease.key, lease.token))
                else:  # kept for last_failure, until the next acquire or prune
                    conn.execute(
                        "UPDATE leases SET state = 'failed', expires_at = ?, error_type = ?, "
                        "error_message = ? WHERE fingerprint = ? AND token = ?",
                        (time.time(), *failure, lease.key, lease.token))
        finally:
            self._finish(lease)

    @_operation
    def put(self, receipt: Receipt, lease: Lease) -> bool:
        try:
            with self._write() as conn:
                row = conn.execute("SELECT token, state FROM leases WHERE fingerprint = ?",
                                   (lease.key,)).fetchone()
                if row is None or row[0] != lease.token or row[1] != "held":
                    return False
                conn.execute(f"INSERT OR REPLACE INTO receipts ({_RECEIPT_COLUMNS}) VALUES "
                             f"({_RECEIPT_VALUES})", receipt_row(receipt))
                conn.execute("DELETE FROM leases WHERE fingerprint = ?", (lease.key,))
            return True
        finally:
            self._finish(lease)

    @_operation
    def last_failure(self, key: str) -> Failure | None:
        row = self._conn().execute(
            "SELECT token, error_type, error_message FROM leases WHERE fingerprint = ? AND "
            "state = 'failed'", (key,)).fetchone()
        return Failure(*row) if row else None

    @_translated  # not an operation: a fork need not wait for it (its reads are)
    def wait(self, key: str, timeout: float) -> None:
        if self._locks is not None:
            self._locks.wait(key, timeout)
            return
        # No liveness lock: poll the lease until it is released or lapses.
        deadline, pause = time.monotonic() + timeout, 0.001
        while time.monotonic() < deadline:
            row = self._lease_state(key)
            if row is None or row[0] != "held" or row[1] <= time.time():
                return
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, POLL_SECONDS)

    @_operation
    def _lease_state(self, key: str) -> tuple[str, float] | None:
        row: tuple[str, float] | None = self._conn().execute(
            "SELECT state, expires_at FROM leases WHERE fingerprint = ?", (key,)).fetchone()
        return row

    # -- statistics -----------------------------------------------------------------

    @_operation
    def save_stats(
        self, run_id: str, process_id: str, counters: Mapping[str, Mapping[str, float]]
    ) -> None:
        now = time.time()
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?, ?)",
                [(run_id, process_id, tool, json.dumps(dict(values), sort_keys=True), now)
                 for tool, values in counters.items()],
            )

    @_operation
    def load_stats(self, run_id: str | None) -> list[tuple[str, str, dict[str, float]]]:
        query = "SELECT run_id, tool_name, counters FROM stats"
        rows = (self._conn().execute(query + " WHERE run_id = ?", (run_id,)) if run_id
                else self._conn().execute(query))
        return [(run, tool, load_counters(counters, str(self.path), run, tool,
                                          "delete that row of the stats table"))
                for run, tool, counters in rows]

    @_operation
    def first_call(self, run_id: str, key: str) -> bool:
        with self._write() as conn:
            if not self._has_seen:
                _ensure_seen_table(conn)
            first = bool(conn.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)",
                                      (run_id, key, time.time())).rowcount)
        self._has_seen = True  # committed: the table is there for good
        return first

    @_operation
    def latest_run(self) -> str | None:
        row = self._conn().execute(
            "SELECT run_id FROM stats ORDER BY updated_at DESC LIMIT 1").fetchone()
        return row[0] if row else None

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
            if len(rows) < BATCH:
                return
            after = (rows[-1][_TOOL_COLUMN], rows[-1][_FINGERPRINT_COLUMN])

    @_operation
    def _receipts_page(self, after: tuple[object, ...] | None) -> list[Any]:
        """The rows with a NULL key for ``None``, else the next page of the others after
        ``after`` (``()``: the first page)."""
        select = f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE "
        order = " ORDER BY tool_name, fingerprint"
        conn = self._conn()
        if after is None:
            return conn.execute(f"{select}tool_name IS NULL OR fingerprint IS NULL{order}"
                                ).fetchall()
        keyed = "tool_name IS NOT NULL AND fingerprint IS NOT NULL"
        if not after:
            return conn.execute(f"{select}{keyed}{order} LIMIT {BATCH}").fetchall()
        return conn.execute(f"{select}{keyed} AND (tool_name, fingerprint) > (?, ?)"
                            f"{order} LIMIT {BATCH}", after).fetchall()

    @_operation
    def _ensure_tool_index(self) -> None:
        # Pages in (tool_name, fingerprint) order, each found in log time. Stores made
        # before the index get it on their first listing (one write, once).
        conn = self._conn()
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = "
                        "'receipts_by_tool'").fetchone() is None:
            with self._write(conn):
                conn.execute(_TOOL_INDEX)

    @_operation
    def import_receipt(self, receipt: Receipt) -> None:
        with self._write() as conn:
            conn.execute(f"INSERT OR REPLACE INTO receipts ({_RECEIPT_COLUMNS}) VALUES "
                         f"({_RECEIPT_VALUES})", receipt_row(receipt))

    def import_receipts(self, receipts: Iterable[Receipt]) -> int:
        # One transaction per BATCH: the write lock is held for a page at a time, never
        # while the caller's iterable runs (it may parse, check and print).
        count = 0
        for batch in _batches(receipts):
            self._import_batch(batch)
            count += len(batch)
        return count

    @_operation
    def _import_batch(self, batch: list[Receipt]) -> None:
        with self._write() as conn:
            conn.executemany(f"INSERT OR REPLACE INTO receipts ({_RECEIPT_COLUMNS}) VALUES "
                             f"({_RECEIPT_VALUES})", [receipt_row(r) for r in batch])

    @_operation
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
            _ensure_seen_table(conn)
            conn.execute("DELETE FROM seen WHERE at <= ?", (now - _SEEN_SECONDS,))
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

    @_operation
    def check(self) -> list[str]:
        rows = self._conn().execute("PRAGMA quick_check").fetchall()
        return [] if rows == [("ok",)] else [f"{self.path}: {' '.join(str(row[0]).split())}"
                                             for row in rows]

    def close(self) -> None:
        self._conns.close_all()


_SEEN_SECONDS = 86400


def _batches(items: Iterable[Receipt]) -> Iterator[list[Receipt]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, BATCH)):
        yield batch


def _ensure_seen_table(conn: sqlite3.Connection) -> None:
    # Created on first use, so stores made before it need no migration.
    conn.execute("CREATE TABLE IF NOT EXISTS seen (run_id TEXT NOT NULL, fingerprint TEXT "
                 "NOT NULL, at REAL NOT NULL, PRIMARY KEY (run_id, fingerprint)) WITHOUT ROWID")


