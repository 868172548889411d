"""The liveness lock: a lock on an open file that its holder keeps while it executes, that
others can wait on, and that the operating system releases when the holder dies.

One interface, one implementation per platform:

- POSIX: ``flock``. A waiter blocks in the kernel and wakes the moment the holder finishes.
- Windows: ``msvcrt.locking`` on the file's first byte. It cannot block without a 1-second
  retry step, so a waiter polls with a non-blocking attempt every few milliseconds (at most
  ``POLL_SECONDS`` late).
- Neither: :func:`platform_lock` returns ``None`` and the SQLite store falls back to lease
  expiry (a waiter polls the lease; a killed holder is taken over when its lease lapses).
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Protocol

# The longest a Windows waiter sleeps between two attempts.
POLL_SECONDS = 0.02


class LivenessLock(Protocol):
    name: str
    # Whether a lock file may be unlinked while others hold it open (POSIX), or only once
    # nobody has it open (Windows refuses the unlink).
    unlinks_open_files: bool

    def try_lock(self, fd: int) -> bool:
        """Take the lock without blocking; ``False`` if someone holds it."""

    def unlock(self, fd: int) -> None:
        """Release the lock (before the fd is closed: a forked child may share it)."""

    def wait_free(self, fd: int) -> None:
        """Block until nobody holds the lock; returns without holding it."""


class Flock:
    name = "flock"
    unlinks_open_files = True

    def __init__(self) -> None:
        self._fcntl = importlib.import_module("fcntl")

    def try_lock(self, fd: int) -> bool:
        try:
            self._fcntl.flock(fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self, fd: int) -> None:
        self._fcntl.flock(fd, self._fcntl.LOCK_UN)

    def wait_free(self, fd: int) -> None:
        self._fcntl.flock(fd, self._fcntl.LOCK_SH)
        self._fcntl.flock(fd, self._fcntl.LOCK_UN)


class WindowsLock:
    name = "msvcrt"
    unlinks_open_files = False

    def __init__(self) -> None:
        self._msvcrt = importlib.import_module("msvcrt")

    def _lock_byte(self, fd: int, mode: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)  # locking() starts at the file position
        self._msvcrt.locking(fd, mode, 1)

    def try_lock(self, fd: int) -> bool:
        try:
            self._lock_byte(fd, self._msvcrt.LK_NBLCK)
        except OSError:  # held elsewhere (EACCES / EDEADLOCK)
            return False
        return True

    def unlock(self, fd: int) -> None:
        self._lock_byte(fd, self._msvcrt.LK_UNLCK)

    def wait_free(self, fd: int) -> None:
        pause = 0.001
        while not self.try_lock(fd):
            time.sleep(pause)
            pause = min(pause * 2, POLL_SECONDS)
        self.unlock(fd)


def platform_lock() -> LivenessLock | None:
    """The liveness lock this platform has, or ``None`` (lease expiry instead)."""
    for kind in (Flock, WindowsLock):
        try:
            return kind()
        except ImportError:
            continue
    return None
