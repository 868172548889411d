"""Lease renewal: a held lease is renewed each third of its term while its tool runs.

One thread per engine, alive while leases are held (and a few seconds after, so that a run
of short calls does not start one each), renews each lease when it is due (a tool shorter
than a third of its lease never pays a renewal).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator

from ._platform import at_fork_in_child
from .store.base import Lease, ReceiptStore

IDLE_SECONDS = 5.0


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
        self._wake_at = 0.0  # when the thread wakes next, if nothing wakes it sooner

    @contextlib.contextmanager
    def hold(self, lease: Lease) -> Iterator[None]:
        due_at = time.monotonic() + lease.lease_seconds / 3
        with self._cond:
            self._due[id(lease)] = (due_at, lease)
            if self._running:
                if due_at < self._wake_at:  # else it wakes in time: no switch per call
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
        idle_since = None
        while True:
            with self._cond:
                now = time.monotonic()
                if not self._due:
                    idle_since = idle_since or now
                    self._wake_at = idle_since + IDLE_SECONDS
                    if now >= self._wake_at:
                        self._running = False
                        return
                    self._cond.wait(self._wake_at - now)
                    continue
                idle_since = None
                next_at = min(at for at, _ in self._due.values())
                if next_at > now:
                    self._wake_at = next_at
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
