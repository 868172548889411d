"""The embedded store: one SQLite file (WAL) shared by every process on the machine.

Leases live in the database (fencing tokens from one global counter, so they only
grow even after ``prune``). Beside them, the holder keeps an ``flock`` on a per-key
lock file for as long as it executes. Waiters in other processes block on that lock,
so the kernel wakes them the moment the holder finishes and also when it dies: no
polling, and a killed holder is taken over at once instead of after its lease lapses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..models import RECEIPT_FIELDS, Receipt, StoreError, receipt_row
from ..signing import key_path_for
from .base import Busy, Failure, Lease, ReceiptStore, load_counters, translating

SCHEMA_VERSION = 1
_RECEIPT_COLUMNS = ", ".join(RECEIPT_FIELDS)  # one column per field, in the receipt's order
_RECEIPT_VALUES = ", ".join("?" * len(RECEIPT_FIELDS))
_SCHEMA = f"""
CREATE TABLE receipts ({_RECEIPT_COLUMNS.replace("fingerprint,", "fingerprint TEXT PRIMARY KEY,", 1)});
CREATE INDEX receipts_by_expiry ON receipts (expires_at);
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

# Lock fds this process holds; closed in a forked child so a child cannot keep a
# parent's lease alive after the parent is gone.
_HELD_FDS: set[int] = set()


def _close_inherited_fds() -> None:
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_fds)


class _KeyLocks:
    """One lock file per key in flight; the file exists only while a holder runs.

    Lock files live only in a real directory of this user, and only under names of the
    lock-file form, so that ``prune`` can tell its own files from anything else."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> str:
        if not _LOCK_NAME.fullmatch(key):
            raise StoreError(f"lock key {key!r} is not a fingerprint (64 lowercase hex digits)")
        return os.path.join(self.directory, key)

    def try_lock(self, key: str) -> int | None:
        path = self._path(key)
        self._check_directory(create=True)
        while True:
            try:
                fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
            except (FileNotFoundError, NotADirectoryError):  # removed since the check
                self._check_directory(create=True)
                continue
            try:
                info = _regular(fd, path)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(path, info):
                _HELD_FDS.add(fd)
                return fd
            os.close(fd)  # the previous holder unlinked it after we opened: lock the new one

    def unlock(self, key: str, fd: int) -> None:
        path = self._path(key)
        if _same_file(path, os.fstat(fd)):  # not a newer holder's file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        _HELD_FDS.discard(fd)
        # Unlock before closing: a forked child may still hold a copy of this fd.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def wait(self, key: str, timeout: float) -> None:
        path = self._path(key)
        if not self._check_directory(create=False):
            return
        try:
            fd = _open_lock_file(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            _regular(fd, path)
        except BaseException:
            os.close(fd)
            raise
        released = threading.Event()

        def block() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: a forked child may share this fd
            finally:
                os.close(fd)
                released.set()

        # flock has no timeout: block in a helper thread and stop waiting for it after
        # `timeout`. The thread ends when the holder does and closes only its own fd.
        threading.Thread(target=block, name="singleflight-wait", daemon=True).start()
        released.wait(timeout)

    def _check_directory(self, create: bool) -> bool:
        """Whether the lock directory exists (made if ``create``); raises unless it is a
        real directory of this user. Checked by path before each use: replacing it after
        the check needs write access to the store's own directory (a sticky /tmp does
        not give that), and whoever has it can replace the store itself."""
        try:
            info = os.lstat(self.directory)
        except FileNotFoundError:
            if not create:
                return False
            self._make_directory()
            info = os.lstat(self.directory)
        self._refuse_unless_ours(info)
        return True

    def _refuse_unless_ours(self, info: os.stat_result) -> None:
        if stat.S_ISLNK(info.st_mode):
            raise StoreError(f"lock directory {self.directory} is a symlink, and lock files are "
                             f"only kept in a real directory; delete the symlink (not its target)")
        if not stat.S_ISDIR(info.st_mode):
            raise StoreError(f"cannot make the lock directory {self.directory}: a file of that "
                             f"name exists; move that file away")
        if info.st_uid != os.geteuid():
            raise StoreError(f"lock directory {self.directory} belongs to another user; delete "
                             f"it or pass another --db")

    def _make_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:  # e.g. a file of that name
            raise StoreError(f"cannot make the lock directory {self.directory}: "
                             f"{exc.strerror}; move that file away") from None

    def prune(self) -> int:
        """Delete the lock files no holder has locked: only regular files of this user, with
        names of the lock-file form, in this user's real lock directory (never through a
        symlink, which would delete the files it points to)."""
        if not self._check_directory(create=False):
            return 0
        # Opened without following a symlink, so the directory listed is the one checked.
        try:
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            self._refuse_unless_ours(os.fstat(directory))
            return sum(_prune_file(directory, name) for name in os.listdir(directory)
                       if _LOCK_NAME.fullmatch(name))
        finally:
            os.close(directory)


# What fingerprint_of returns: the only names a lock file ever has, and the only ones
# prune deletes.
_LOCK_NAME = re.compile(r"[0-9a-f]{64}")

# O_NOFOLLOW: a symlink is never a lock file. O_NONBLOCK: opening a FIFO planted at a
# lock path must not hang (it is then refused as not a regular file). flock ignores it.
_LOCK_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_lock_file(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | _LOCK_FLAGS, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
    raise StoreError(f"lock file {path} is a symlink, never a lock file; delete the symlink")


def _regular(fd: int, path: str) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"lock file {path} is not a regular file; delete it")
    return info


def _same_file(path: str, info: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)


def _prune_file(directory: int, name: str) -> int:
    """1 if the lock file ``name`` was stale and deleted; anything not provably a lock
    file of this user (a symlink, FIFO, directory, another user's file) is left alone."""
    try:
        fd = os.open(name, os.O_RDWR | _LOCK_FLAGS, dir_fd=directory)
    except OSError:  # gone, a symlink, a directory, a socket: not ours to delete
        return 0
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a live holder's
        try:
            now = os.stat(name, dir_fd=directory, follow_symlinks=False)
            # Its holder may have finished and a new one made a new file: that one is live.
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                return 0
            os.unlink(name, dir_fd=directory)
            return 1
        except FileNotFoundError:
            return 0
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # before closing: a forked child may share this fd
    finally:
        os.close(fd)


_translated = translating(sqlite3.Error, OSError)


class SQLiteStore(ReceiptStore):
    """A :class:`ReceiptStore` in one SQLite file; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        self.url = str(self.path)
        self._local = threading.local()
        self._open_file()
        self.identity = f"sqlite:{os.path.realpath(self.path)}"
        self.key_path = key_path_for(self.path)
        self._has_seen = False  # the table of mode "off", made once per store and process
        self._locks = _KeyLocks(self.path.with_name(self.path.name + ".locks"))

    # -- connection and schema ------------------------------------------------------

    def _open_file(self) -> None:
        if self.path.is_dir():
            raise StoreError(f"store path {self.path} is a directory; pass a file path like "
                             f"{self.path / 'receipts.db'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot open store {self.path}: {exc.strerror}; check the path "
                             f"and its permissions") from None
        try:
            self._ensure_schema(self._conn())
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable singleflight store ({exc}); move it "
                             f"away or pass another --db") from None

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                   check_same_thread=False, cached_statements=64)
            conn.execute("PRAGMA synchronous=NORMAL")
            # Bytes that are not UTF-8 (a damaged row) decode with replacement characters,
            # so the receipt fails its signature check instead of aborting the read.
            conn.text_factory = lambda data: data.decode("utf-8", "replace")
            local.conn, local.pid = conn, os.getpid()
            local.receipts, local.data_version = {}, None
        return conn

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
        self._local.receipts = {}  # our own commits do not move data_version

    # -- receipts and leases --------------------------------------------------------

    @_translated
    def get(self, key: str) -> Receipt | None:
        # Receipts this thread read stay valid until the file changes: data_version moves
        # on every commit by another connection (ours clear the memo in _write), and is
        # cheaper than reading the row again. A hit therefore costs one pragma.
        conn, local = self._conn(), self._local
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
                receipts.clear()
            receipt = receipts[key] = Receipt(*row)
        return receipt

    @_translated
    def acquire(self, key: str, owner: str, lease_seconds: float) -> Lease | Busy:
        fd = self._locks.try_lock(key)
        if fd is None:
            row = self._conn().execute(
                "SELECT token, state FROM leases WHERE fingerprint = ?", (key,)).fetchone()
            token = 0 if row is None else row[0] if row[1] == "held" else row[0] + 1
            return Busy(since_token=token)
        try:
            with self._write() as conn:
                row = conn.execute("SELECT state FROM leases WHERE fingerprint = ?",
                                   (key,)).fetchone()
                # We hold the lock file, so a lease still marked held has a dead holder.
                takeover = row is not None and row[0] == "held"
                token = conn.execute(
                    "UPDATE meta SET value = value + 1 WHERE name = 'token' RETURNING value"
                ).fetchone()[0]
                conn.execute(
                    "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, 'held', ?, NULL, NULL)",
                    (key, token, owner, time.time() + lease_seconds),
                )
        except BaseException:
            self._locks.unlock(key, fd)
            raise
        return Lease(key, token, owner, lease_seconds, takeover, fd)

    @_translated
    def renew(self, lease: Lease) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE leases SET expires_at = ? WHERE fingerprint = ? AND token = ? "
                "AND state = 'held'", (time.time() + lease.lease_seconds, lease.key, lease.token))
        return cursor.rowcount == 1

    def _finish(self, lease: Lease) -> None:
        if lease.handle is not None:
            self._locks.unlock(lease.key, lease.handle)
            lease.handle = None

    @_translated
    def release(self, lease: Lease, failure: tuple[str, str] | None = None) -> None:
        error_type, message = failure or (None, None)
        try:
            with self._write() as conn:
                conn.execute(
                    "UPDATE leases SET state = ?, expires_at = ?, error_type = ?, "
                    "error_message = ? WHERE fingerprint = ? AND token = ?",
                    ("failed" if failure else "released", time.time(), error_type, message,
                     lease.key, lease.token),
                )
        finally:
            self._finish(lease)

    @_translated
    def put(self, receipt: Receipt, lease: Lease) -> bool:
        try:
            with self._write() as conn:
                row = conn.execute("SELECT token, state FROM leases WHERE fingerprint = ?",
                                   (lease.key,)).fetchone()
                if row is None or row[0] != lease.token or row[1] != "held":
                    return False
                conn.execute(f"INSERT OR REPLACE INTO receipts ({_RECEIPT_COLUMNS}) VALUES "
                             f"({_RECEIPT_VALUES})", receipt_row(receipt))
                conn.execute("UPDATE leases SET state = 'done', expires_at = ? "
                             "WHERE fingerprint = ?", (time.time(), lease.key))
            return True
        finally:
            self._finish(lease)

    @_translated
    def last_failure(self, key: str) -> Failure | None:
        row = self._conn().execute(
            "SELECT token, error_type, error_message FROM leases WHERE fingerprint = ? AND "
            "state = 'failed'", (key,)).fetchone()
        return Failure(*row) if row else None

    @_translated
    def wait(self, key: str, timeout: float) -> None:
        self._locks.wait(key, timeout)

    # -- statistics -----------------------------------------------------------------

    @_translated
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

    @_translated
    def load_stats(self, run_id: str | None) -> list[tuple[str, str, dict[str, float]]]:
        query = "SELECT run_id, tool_name, counters FROM stats"
        rows = (self._conn().execute(query + " WHERE run_id = ?", (run_id,)) if run_id
                else self._conn().execute(query))
        return [(run, tool, load_counters(counters, str(self.path), run, tool,
                                          "delete that row of the stats table"))
                for run, tool, counters in rows]

    @_translated
    def first_call(self, run_id: str, key: str) -> bool:
        with self._write() as conn:
            if not self._has_seen:
                _ensure_seen_table(conn)
            first = bool(conn.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)",
                                      (run_id, key, time.time())).rowcount)
        self._has_seen = True  # committed: the table is there for good
        return first

    @_translated
    def latest_run(self) -> str | None:
        row = self._conn().execute(
            "SELECT run_id FROM stats ORDER BY updated_at DESC LIMIT 1").fetchone()
        return row[0] if row else None

    # -- maintenance ----------------------------------------------------------------

    @_translated
    def iter_receipts(self) -> Iterator[Receipt]:
        rows = self._conn().execute(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts ORDER BY tool_name, fingerprint").fetchall()
        return (Receipt(*row) for row in rows)

    @_translated
    def import_receipt(self, receipt: Receipt) -> None:
        with self._write() as conn:
            conn.execute(f"INSERT OR REPLACE INTO receipts ({_RECEIPT_COLUMNS}) VALUES "
                         f"({_RECEIPT_VALUES})", receipt_row(receipt))

    @_translated
    def prune(self, now: float) -> dict[str, int]:
        # First: a lock directory that is not ours is refused before anything is deleted.
        lock_files = self._locks.prune()
        before = self._bytes()
        with self._write() as conn:
            receipts = conn.execute("DELETE FROM receipts WHERE expires_at <= ?", (now,)).rowcount
            # A held lease may belong to a live holder whose heartbeat lags: only drop those
            # whose holder has been silent for an hour.
            leases = conn.execute("DELETE FROM leases WHERE state != 'held' OR expires_at <= ?",
                                  (now - 3600,)).rowcount
            _ensure_seen_table(conn)
            conn.execute("DELETE FROM seen WHERE at <= ?", (now - _SEEN_SECONDS,))
        conn = self._conn()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # VACUUM wrote the shrunk file to the WAL
        return {"receipts": receipts, "leases": leases, "lock_files": lock_files,
                "bytes_before": before, "bytes_after": self._bytes()}

    def _bytes(self) -> int:
        """The store's size on disk: the file and its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    @_translated
    def check(self) -> list[str]:
        rows = self._conn().execute("PRAGMA quick_check").fetchall()
        return [] if rows == [("ok",)] else [f"{self.path}: {' '.join(str(row[0]).split())}"
                                             for row in rows]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()


_SEEN_SECONDS = 86400


def _ensure_seen_table(conn: sqlite3.Connection) -> None:
    # Created on first use, so stores made before it need no migration.
    conn.execute("CREATE TABLE IF NOT EXISTS seen (run_id TEXT NOT NULL, fingerprint TEXT "
                 "NOT NULL, at REAL NOT NULL, PRIMARY KEY (run_id, fingerprint)) WITHOUT ROWID")


