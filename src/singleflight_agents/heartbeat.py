"""Lease renewal: a held lease is renewed each third of its term while its tool runs.

One thread per engine, alive only while leases are held, renews each lease when it is
due (a tool shorter than a third of its lease never pays a renewal).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

from .store.base import Lease, ReceiptStore


class Heartbeat:
    def __init__(self, store: ReceiptStore) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, Lease]] = {}
        self._running = False
        self._pid = os.getpid()

    @contextlib.contextmanager
    def hold(self, lease: Lease) -> Iterator[None]:
        with self._cond:
            if self._pid != os.getpid():  # forked: the parent's thread and leases are not ours
                self._pid, self._due, self._running = os.getpid(), {}, False
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
