"""The SQLite store's connections: one per thread and process, every one of them closed by
``close_all`` (whichever thread opened it) or when its thread ends.

A connection is never closed while a store operation uses it: that crashes the process in
SQLite. ``close_all`` and a fork first pause new operations and wait for those in flight
(each bounded by SQLite's busy timeout); one that still runs after ``QUIET_SECONDS`` keeps the
connections open (left to the end of their threads) rather than having them closed under it.

No connection is open across a fork when the store is quiet. SQLite keeps per-process state
about each open file (its locks, the mapped WAL index); a child that inherits it believes it
holds locks it does not, and its commits can be lost. So before a fork every store closes its
connections, and both processes reopen lazily. A connection a child inherits anyway is never
closed nor collected there.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._platform import at_fork

# Connections inherited across a fork, kept (unused) so that they are never closed here.
_INHERITED: list[sqlite3.Connection] = []
# How long close() or a fork waits for operations in flight: longer than SQLite's busy timeout
# (60 s), which bounds each of them.
QUIET_SECONDS = 65.0


def _close_in_owner(conn: sqlite3.Connection, pid: int) -> None:
    if os.getpid() == pid:
        conn.close()
    else:
        _INHERITED.append(conn)


def _lenient(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def not_utf8(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's refusal of text that is not UTF-8."""
    return isinstance(exc, sqlite3.OperationalError) and "decode" in str(exc)


class _ThreadEnd:
    """Held only by its thread's local storage: collected when that thread ends."""


class Connections:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.local = threading.local()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._paused = False  # close_all or a fork waits for quiet
        self._forked_paused = False  # this store paused in the running fork's before-hook
        self._finalizers: list[weakref.finalize[Any, _ThreadEnd]] = []
        _STORES.add(self)

    def enter(self) -> None:
        """Before each store operation (then ``leave``). Counted first, then the pause is
        checked: a pauser sets the flag first, then counts, so one of them sees the other."""
        with self._lock:
            self._in_flight += 1
        while self._paused:
            with self._idle:
                if not self._paused:
                    break
                self._in_flight -= 1
                self._idle.notify_all()
                self._idle.wait_for(lambda: not self._paused)
                self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._paused:
                self._idle.notify_all()

    def _quiet(self) -> bool:
        """Pause new operations and wait for those in flight; whether it became quiet.
        Called holding ``_lock``; ``_resume`` ends the pause."""
        self._paused = True
        return self._idle.wait_for(lambda: self._in_flight == 0, QUIET_SECONDS)

    def _resume(self) -> None:
        self._paused = False
        self._idle.notify_all()

    def get(self) -> sqlite3.Connection:
        local = self.local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._open()
            # The thread's end collects the marker, and that closes the connection.
            marker = _ThreadEnd()
            finalizer = weakref.finalize(marker, _close_in_owner, conn, os.getpid())
            # Not at interpreter exit: a daemon thread may still be using it, and the process
            # ending closes it anyway.
            finalizer.atexit = False
            with self._lock:
                self._finalizers = [f for f in self._finalizers if f.alive]
                self._finalizers.append(finalizer)
            local.conn, local.pid, local.marker = conn, os.getpid(), marker
            local.receipts, local.data_version = OrderedDict(), None
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                               check_same_thread=False, cached_statements=64)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def leniently(self) -> Iterator[None]:
        """This thread's reads decode bytes that are not UTF-8 (a damaged row) with
        replacement characters, so that its receipt fails its signature check instead of
        aborting the read. Only then: a Python text factory slows every row read."""
        conn = self.get()
        conn.text_factory = _lenient
        try:
            yield
        finally:
            conn.text_factory = str

    def close_all(self) -> None:
        """Close every connection this process opened, on every thread, once no operation
        uses them (see the module docstring)."""
        with self._lock:
            try:
                if self._quiet():
                    self._close_locked()
            finally:
                self._resume()

    def _close_locked(self) -> None:
        finalizers, self._finalizers = self._finalizers, []
        self.local = threading.local()
        for finalizer in finalizers:
            finalizer()

    # Holding the lock from before the fork to after it (in both processes) means the child
    # never inherits it held by a thread that does not exist there.
    def _before_fork(self) -> None:
        self._lock.acquire()
        self._forked_paused = True
        if self._quiet():
            self._close_locked()

    def _after_fork(self) -> None:
        if self._forked_paused:  # not a store made during the fork
            self._forked_paused = False
            self._resume()
            self._lock.release()


_STORES: weakref.WeakSet[Connections] = weakref.WeakSet()


def _before_fork() -> None:
    for conns in list(_STORES):
        conns._before_fork()


def _after_fork() -> None:
    for conns in list(_STORES):
        conns._after_fork()


at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)
