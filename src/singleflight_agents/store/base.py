"""The storage interface the engine talks to; backends implement it."""

from __future__ import annotations

import abc
import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from ..models import Receipt, StoreError

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="ReceiptStore")


def load_counters(text: Any, where: str, run: str, tool: str, fix: str) -> Any:
    """A stored row of statistics, parsed; text that is not JSON is a :class:`StoreError`
    naming the run, the tool and how to get rid of the row."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise StoreError(f"{where}: the statistics of run {run!r}, tool {tool!r} are damaged "
                         f"(not JSON); {fix}") from None


def translating(
    *errors: type[BaseException],
) -> Callable[[Callable[Concatenate[S, P], R]], Callable[Concatenate[S, P], R]]:
    """Decorator for store methods: the backend's ``errors`` leave as :class:`StoreError`
    naming the store, which the engine knows how to handle (fall back, warn)."""

    def decorate(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        @functools.wraps(method)
        def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(self, *args, **kwargs)
            except errors as exc:
                raise StoreError(f"store {self.url}: {exc}") from exc

        return wrapper

    return decorate

# Plain classes, not dataclasses: each dataclass costs milliseconds at import.


class Lease:
    """The right to execute one fingerprint, fenced by ``token`` (only ever grows).
    ``handle`` is the backend's own (the SQLite store keeps the lock file there)."""

    __slots__ = ("handle", "key", "lease_seconds", "owner", "takeover", "token")

    def __init__(self, key: str, token: int, owner: str, lease_seconds: float,
                 takeover: bool = False, handle: Any = None) -> None:
        self.key, self.token, self.owner = key, token, owner
        self.lease_seconds, self.takeover, self.handle = lease_seconds, takeover, handle


class Busy:
    """Another process holds the lease. A failure with ``token >= since_token`` is theirs."""

    __slots__ = ("since_token",)

    def __init__(self, since_token: int) -> None:
        self.since_token = since_token


class Failure:
    """What the last holder's tool raised."""

    __slots__ = ("error_type", "message", "token")

    def __init__(self, token: int, error_type: str, message: str) -> None:
        self.token, self.error_type, self.message = token, error_type, message


class ReceiptsAndLeases(abc.ABC):
    """What the engine needs on every shared call: receipts read and written, leases taken,
    renewed and given back, and a wait for a lease's holder."""

    @abc.abstractmethod
    def get(self, key: str) -> Receipt | None:
        """The stored receipt for ``key``, unverified and maybe expired, or ``None``."""

    @abc.abstractmethod
    def acquire(self, key: str, owner: str, lease_seconds: float) -> Lease | Busy:
        """Take the lease for ``key``, or report who holds it."""

    @abc.abstractmethod
    def renew(self, lease: Lease) -> bool:
        """Extend a held lease; ``False`` if it was lost to a newer token."""

    @abc.abstractmethod
    def release(self, lease: Lease, failure: tuple[str, str] | None = None) -> None:
        """Give the lease up, marking it failed with ``(type, message)`` if given."""

    @abc.abstractmethod
    def put(self, receipt: Receipt, lease: Lease) -> bool:
        """Store ``receipt`` and release ``lease`` if the lease is still ours."""

    @abc.abstractmethod
    def last_failure(self, key: str) -> Failure | None:
        """The failure recorded by the last holder of ``key``, if it failed."""

    @abc.abstractmethod
    def wait(self, key: str, timeout: float) -> None:
        """Block until ``key``'s holder finishes or dies, or ``timeout`` seconds pass."""


class Statistics(abc.ABC):
    """The run's counters, written by every process of the run and summed for the report."""

    @abc.abstractmethod
    def save_stats(
        self, run_id: str, process_id: str, counters: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Replace this process's per-tool counters for ``run_id``."""

    @abc.abstractmethod
    def load_stats(self, run_id: str | None) -> list[tuple[str, str, dict[str, float]]]:
        """``(run_id, tool_name, counters)`` rows of one run (or all runs for ``None``)."""

    @abc.abstractmethod
    def first_call(self, run_id: str, key: str) -> bool:
        """Whether this is the first call of ``key`` in ``run_id`` (mode ``off`` counts the
        others as duplicates, across every process of the run). Kept for a day."""

    @abc.abstractmethod
    def latest_run(self) -> str | None:
        """The run whose statistics were written last."""


class Admin(abc.ABC):
    """What the command line does to a store: list, import, prune and check it."""

    @abc.abstractmethod
    def iter_receipts(self) -> Iterator[Receipt]:
        """Every receipt, ordered by tool name then fingerprint. Streamed where the backend
        can: memory must not grow with the store (``export`` and ``verify`` consume it
        lazily)."""

    def keyed_receipts(self) -> Iterator[tuple[str, Receipt]]:
        """Every receipt with the key the engine looks it up by, which must be its
        fingerprint (``verify`` checks it). A backend whose key can differ from the
        fingerprint column (Redis: the key is the entry's name) says so here."""
        return ((receipt.fingerprint, receipt) for receipt in self.iter_receipts())

    @abc.abstractmethod
    def import_receipt(self, receipt: Receipt) -> None:
        """Store an already signed receipt (used by ``import``)."""

    def import_receipts(self, receipts: Iterable[Receipt]) -> int:
        """Store already signed receipts, consuming ``receipts`` as it goes (never all of
        them at once); how many were stored. A backend may batch them (the SQLite store
        writes one transaction per thousand); the default stores them one by one."""
        count = 0
        for receipt in receipts:
            self.import_receipt(receipt)
            count += 1
        return count

    @abc.abstractmethod
    def prune(self, now: float) -> dict[str, int]:
        """Drop expired receipts and finished or dead leases; reclaim space. Counts by kind
        (``receipts``, ``leases``, ...), plus ``bytes_before`` and ``bytes_after`` for a
        store that is a file."""

    @abc.abstractmethod
    def check(self) -> list[str]:
        """Problems found by the backend's own integrity check (empty when healthy)."""


class ReceiptStore(ReceiptsAndLeases, Statistics, Admin):
    """Receipts, leases and statistics of one deduplication domain: the interface each
    backend implements (see docs/stores.md).

    Every method is blocking and thread-safe. ``identity`` names the domain: two store
    objects with the same identity see the same data. ``key_path`` is where the signing key
    lives beside the store when it is a file (never inside the store it protects); ``None``
    when the key must come from ``secret=`` or ``$SINGLEFLIGHT_SECRET``.
    """

    url: str
    identity: str
    key_path: Path | None = None
    # Whether an async call's store operations run on its event loop (a local file, or a
    # server's round trips when that is faster: Redis without ?offload=1); else they run in
    # store threads, and the loop never waits on the store.
    runs_on_loop: bool = False

    @abc.abstractmethod
    def close(self) -> None:
        """Release this process's connections."""
