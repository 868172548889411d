"""The embedded store: one SQLite file (WAL) shared by every process on the machine.

Leases live in the database (fencing tokens from one global counter, so they only
grow even after ``prune``). Beside them, the holder keeps a lock on a per-key lock file
for as long as it executes (:mod:`._locks`): waiters in other processes are woken the
moment the holder finishes and also when it dies. On a platform with no such lock
(:mod:`._liveness`), a held lease is live until it expires, and waiters poll it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path

from .._platform import O_CLOEXEC
from ..models import Receipt, StoreError, receipt_row
from ..signing import key_path_for
from ._connections import Connections
from ._liveness import POLL_SECONDS, LivenessLock, platform_lock
from ._locks import KeyLocks
from ._sqlite_admin import SQLiteAdmin
from ._sqlite_operation import operation
from ._sqlite_schema import RECEIPT_COLUMNS, RECEIPT_VALUES, SCHEMA, SCHEMA_VERSION, ensure_seen_table
from .base import Busy, Failure, Lease, ReceiptStore, load_counters, translating

BATCH = 1000  # receipts per page of iter_receipts and per transaction of import_receipts

_SCHEMA = SCHEMA  # the tables a new store file gets
_translated = translating(sqlite3.Error, OSError)


class SQLiteStore(SQLiteAdmin, ReceiptStore):
    """A :class:`ReceiptStore` in one SQLite file; see the module docstring."""

    runs_on_loop = True  # microseconds; a WAL reader never waits for a writer

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
                    for statement in SCHEMA.split(";"):
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
        self._conns.local.receipts = OrderedDict()  # our own commits do not move data_version

    # -- receipts and leases --------------------------------------------------------

    @operation
    def get(self, key: str) -> Receipt | None:
        # Receipts this thread read stay valid until the file changes: data_version moves
        # on every commit by another connection (ours clear the memo in _write), and is
        # cheaper than reading the row again. A hit therefore costs one pragma.
        conn, local = self._conn(), self._conns.local
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        receipts: OrderedDict[str, Receipt] = local.receipts
        if version != local.data_version:
            receipts.clear()
            local.data_version = version
        receipt = receipts.get(key)
        if receipt is None:
            row = conn.execute(
                f"SELECT {RECEIPT_COLUMNS} FROM receipts WHERE fingerprint = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            if len(receipts) >= 4096:
                receipts.popitem(last=False)  # the oldest (this thread's own memo)
            receipt = receipts[key] = Receipt(*row)
        return receipt

    @operation
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

    @operation
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

    @operation
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

    @operation
    def put(self, receipt: Receipt, lease: Lease) -> bool:
        try:
            with self._write() as conn:
                row = conn.execute("SELECT token, state FROM leases WHERE fingerprint = ?",
                                   (lease.key,)).fetchone()
                if row is None or row[0] != lease.token or row[1] != "held":
                    return False
                conn.execute(f"INSERT OR REPLACE INTO receipts ({RECEIPT_COLUMNS}) VALUES "
                             f"({RECEIPT_VALUES})", receipt_row(receipt))
                conn.execute("DELETE FROM leases WHERE fingerprint = ?", (lease.key,))
            return True
        finally:
            self._finish(lease)

    @operation
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

    @operation
    def _lease_state(self, key: str) -> tuple[str, float] | None:
        row: tuple[str, float] | None = self._conn().execute(
            "SELECT state, expires_at FROM leases WHERE fingerprint = ?", (key,)).fetchone()
        return row

    # -- statistics -----------------------------------------------------------------

    @operation
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

    @operation
    def load_stats(self, run_id: str | None) -> list[tuple[str, str, dict[str, float]]]:
        query = "SELECT run_id, tool_name, counters FROM stats"
        rows = (self._conn().execute(query + " WHERE run_id = ?", (run_id,)) if run_id
                else self._conn().execute(query))
        return [(run, tool, load_counters(counters, str(self.path), run, tool,
                                          "delete that row of the stats table"))
                for run, tool, counters in rows]

    @operation
    def first_call(self, run_id: str, key: str) -> bool:
        with self._write() as conn:
            if not self._has_seen:
                ensure_seen_table(conn)
            first = bool(conn.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)",
                                      (run_id, key, time.time())).rowcount)
        self._has_seen = True  # committed: the table is there for good
        return first

    @operation
    def latest_run(self) -> str | None:
        row = self._conn().execute(
            "SELECT run_id FROM stats ORDER BY updated_at DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self._conns.close_all()

