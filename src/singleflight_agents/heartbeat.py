"""Lease renewal: a held lease is renewed each third of its term while its tool runs.

One thread per engine, alive only while leases are held, renews each lease when it is
due (a tool shorter than a third of its lease never pays a renewal).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator

from ._platform import at_fork_in_child
from .store.base import Lease, ReceiptStore


class Heartbeat:
    def __init__(self, store: ReceiptStore) -> None:
        self._store = store
        self._after_fork()
        _HEARTBEATS.add(self)

    def _after_fork(self) -> None:
        # The parent's thread and leases are not ours, and its lock may have been held.
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, Lease]] = {}
        self._running = False

    @contextlib.contextmanager
    def hold(self, lease: Lease) -> Iterator[None]:
        with self._cond:
            self._due[id(lease)] = (time.monotonic() + lease.lease_seconds / 3, lease)
            if self._running:
                self._cond.notify()
            else:
                self._running = True
                threading.Thread(target=self._run, name="singleflight-heartbeat",
                                 daemon=True).start()
        try:
            yield
        finally:
            with self._cond:
                self._due.pop(id(lease), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._due:
                    self._running = False
                    return
                now = time.monotonic()
                next_at = min(at for at, _ in self._due.values())
                if next_at > now:
                    self._cond.wait(next_at - now)
                    continue
                due = [lease for at, lease in self._due.values() if at <= now]
                for lease in due:
                    self._due[id(lease)] = (now + lease.lease_seconds / 3, lease)
            for lease in due:
                with contextlib.suppress(Exception):  # a lost lease shows at the fenced write
                    self._store.renew(lease)


_HEARTBEATS: weakref.WeakSet[Heartbeat] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for beat in list(_HEARTBEATS):
        beat._after_fork()


at_fork_in_child(_reset_after_fork)
