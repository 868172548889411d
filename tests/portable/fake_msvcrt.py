"""A stand-in for Windows' ``msvcrt.locking``, on Linux: one byte-0 lock per open file,
with Windows' semantics where our code relies on them (exclusive only; a held lock makes a
non-blocking attempt fail with ``OSError``; ``LK_LOCK`` gives up after 10 one-second tries).
Built on ``flock``, which, like Windows' ``LockFile``, locks per open file and is released by
the operating system when its holder dies."""

from __future__ import annotations

import errno
import time
import types
from typing import Any

LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4


def make(fcntl: Any) -> types.ModuleType:
    module = types.ModuleType("msvcrt", "fake msvcrt for the forced-portable test runs")

    def locking(fd: int, mode: int, nbytes: int) -> None:
        if nbytes != 1:
            raise ValueError("our code locks exactly one byte")
        if mode == LK_UNLCK:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        for attempt in range(10 if mode in (LK_LOCK, LK_RLCK) else 1):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if mode in (LK_LOCK, LK_RLCK) and attempt < 9:
                    time.sleep(1)
        raise OSError(errno.EACCES, "Permission denied")

    module.locking = locking  # type: ignore[attr-defined]
    for name, value in (("LK_UNLCK", LK_UNLCK), ("LK_LOCK", LK_LOCK), ("LK_NBLCK", LK_NBLCK),
                        ("LK_RLCK", LK_RLCK), ("LK_NBRLCK", LK_NBRLCK)):
        setattr(module, name, value)
    return module
