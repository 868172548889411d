"""What every command of the command line shares: its name, the user's mistake, the store."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from .engine import Singleflight
from .signing import Signer, load_key
from .store import ReceiptStore, SQLiteStore, is_sqlite_url, open_store, sqlite_path

PROG = "singleflight-agents"
T = TypeVar("T")
# A command that runs longer than this shows a progress line on a terminal, redrawn at most
# every PROGRESS_EVERY seconds.
PROGRESS_AFTER = 2.0
PROGRESS_EVERY = 0.25


class UsageError(Exception):
    """A mistake of the user's: printed as one line, exit status 2."""


@contextmanager
def existing_store(db: str | None) -> Iterator[ReceiptStore]:
    if not is_sqlite_url(db):
        store: ReceiptStore = open_store(db)
    else:
        path = sqlite_path(db)
        if not path.is_file():
            raise UsageError(f"no store at {path}; pass --db with the path of an existing store")
        if path.stat().st_size == 0:
            raise UsageError(f"{path} is empty, not a singleflight store; pass --db with the "
                             f"path of an existing store")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"store {path} is not readable and writable by this user; fix its "
                             f"permissions")
        store = SQLiteStore(path)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def new_store(db: str | None) -> Iterator[ReceiptStore]:
    with Singleflight(db) as sf:  # creates the store and its key file
        yield sf.store


def store_signer(store: ReceiptStore) -> Signer:
    return Signer(load_key(None, store.key_path, create=False))


def utf8(text: str) -> bool:
    # A predicate, not models.check_text: its message quotes the whole value, and an
    # export's FAIL line must not print a receipt's output.
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: bytes of another encoding on the command line
        return False
    return True


class Progress:
    """``what: 120,000 receipts, 14 s`` on stderr, redrawn in place while a long command
    runs: only when stderr is a terminal (a pipe, a file and the tests see nothing) and only
    after ``PROGRESS_AFTER`` seconds. A thread draws it, so a command busy in one store call
    (prune) shows it too. Other lines are printed through :meth:`print`, which takes the
    progress line away first; the last one is left in place, ended with a newline."""

    def __init__(self, what: str, *, counting: bool = True, show: bool = True) -> None:
        self.what, self.counting, self.count = what, counting, 0
        self._stream: TextIO = sys.stderr
        self._enabled = show and is_terminal(self._stream)
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._width = 0  # of the line on screen, 0 when there is none
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self._enabled:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._width:
                self._draw()  # the final figure stays, on a line of its own
                self._stream.write("\n")
                self._stream.flush()
                self._width = 0

    def counted(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, lazily, each one counted."""
        for item in items:
            self.count += 1
            yield item

    def print(self, *args: Any, file: TextIO | None = None) -> None:
        """``print``, with the progress line taken away first (it comes back on the next
        redraw)."""
        with self._lock:
            self._clear()
            print(*args, file=file or sys.stdout)

    def _run(self) -> None:
        if self._stop.wait(PROGRESS_AFTER):
            return
        while True:
            with self._lock:
                self._draw()
            if self._stop.wait(PROGRESS_EVERY):
                return

    def _draw(self) -> None:
        seconds = time.monotonic() - self._started
        counted = f"{self.count:,} receipts, " if self.counting else ""
        line = f"{self.what}: {counted}{seconds:.0f} s"
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def _clear(self) -> None:
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False
