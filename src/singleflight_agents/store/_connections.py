"""The SQLite store's connections: one per thread and process, every one of them closed by
``close_all`` (whichever thread opened it) or when its thread ends.

No connection is open across a fork. SQLite keeps per-process state about each open file
(its locks, the mapped WAL index); a child that inherits it believes it holds locks it does
not, and its commits can be lost or the WAL damaged. So before a fork every store waits for
its operations in flight, closes all its connections, and both processes reopen lazily.
A connection a child inherits anyway is never closed nor collected there.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any

from .._platform import at_fork

# Connections inherited across a fork, kept (unused) so that they are never closed here.
_INHERITED: list[sqlite3.Connection] = []
# How long a fork waits for the operations in flight before it closes connections anyway.
_FORK_WAIT_SECONDS = 10.0


def _close_in_owner(conn: sqlite3.Connection, pid: int) -> None:
    if os.getpid() == pid:
        conn.close()
    else:
        _INHERITED.append(conn)


class _ThreadEnd:
    """Held only by its thread's local storage: collected when that thread ends."""


class Connections:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.local = threading.local()
        self._depth = threading.local()  # this thread's nesting of `operation`
        self._idle = threading.Condition()
        self._in_flight = 0
        self._forking = False
        self._finalizers: list[weakref.finalize[Any, _ThreadEnd]] = []
        _STORES.add(self)

    def enter(self) -> None:
        """Before each store operation (then ``leave``): a fork waits while any is in flight."""
        depth = getattr(self._depth, "n", 0)
        with self._idle:
            while self._forking and depth == 0:
                self._idle.wait()
            self._in_flight += 1
        self._depth.n = depth + 1

    def leave(self) -> None:
        self._depth.n -= 1
        with self._idle:
            self._in_flight -= 1
            if self._forking:
                self._idle.notify_all()

    def get(self) -> sqlite3.Connection:
        local = self.local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._open()
            # The thread's end collects the marker, and that closes the connection.
            marker = _ThreadEnd()
            finalizer = weakref.finalize(marker, _close_in_owner, conn, os.getpid())
            with self._idle:
                self._finalizers = [f for f in self._finalizers if f.alive]
                self._finalizers.append(finalizer)
            local.conn, local.pid, local.marker = conn, os.getpid(), marker
            local.receipts, local.data_version = {}, None
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                               check_same_thread=False, cached_statements=64)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        # Bytes that are not UTF-8 (a damaged row) decode with replacement characters,
        # so the receipt fails its signature check instead of aborting the read.
        conn.text_factory = lambda data: data.decode("utf-8", "replace")
        return conn

    def close_all(self) -> None:
        """Close every connection this process opened, on every thread."""
        with self._idle:
            finalizers, self._finalizers = self._finalizers, []
            self.local = threading.local()
        for finalizer in finalizers:
            finalizer()

    # Held from before the fork to after it (in both processes), so that the child never
    # inherits it locked by a thread that does not exist there.
    def _before_fork(self) -> None:
        self._idle.acquire()
        self._forking = True
        self._idle.wait_for(lambda: self._in_flight <= getattr(self._depth, "n", 0),
                            _FORK_WAIT_SECONDS)
        self.close_all()

    def _after_fork(self) -> None:
        self._forking = False
        self._idle.notify_all()
        self._idle.release()


_STORES: weakref.WeakSet[Connections] = weakref.WeakSet()


def _before_fork() -> None:
    for conns in list(_STORES):
        conns._before_fork()


def _after_fork() -> None:
    for conns in list(_STORES):
        conns._after_fork()


at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)
