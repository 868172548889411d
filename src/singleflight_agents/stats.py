"""Per-tool counters, kept in memory and written to the store in batches.

A cache hit only bumps a counter here; the engine writes the counters now and then
(after executions, at most once a second) and at exit, so reading stays read-only.
Each process writes its own row per run, and summaries add the rows of one run up.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from ._platform import at_fork_in_child

COUNTERS = (
    "calls", "executed", "cache_hits", "shared_waits", "unshared", "fallbacks", "takeovers",
    "failures", "tampered", "not_persisted", "fenced_out", "replay_misses", "dollars_saved",
    "latency_saved_ms", "duplicates", "duplicate_dollars", "tokens_in", "tokens_out",
    "tokens_in_saved", "tokens_out_saved", "dollars_spent", "unpriced", "raised",
)
_AMOUNTS = ("dollars_saved", "latency_saved_ms", "duplicate_dollars", "dollars_spent")


class Stats:
    """Thread-safe counters for one engine in one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.flushing = threading.Lock()  # held while the counters are written
        self._pid = os.getpid()
        _ALL.add(self)
        self._tools: dict[str, dict[str, float]] = {}
        self.dirty = False

    def _forked(self) -> None:
        if self._pid != os.getpid():  # a forked child starts from zero
            self._pid, self._tools, self.dirty = os.getpid(), {}, False

    def add(self, tool_name: str, **increments: float) -> None:
        self.add_all(tool_name, increments)

    def add_all(self, tool_name: str, increments: Mapping[str, float]) -> None:
        with self._lock:
            self._forked()
            counters = self._tools.get(tool_name)
            if counters is None:
                counters = self._tools[tool_name] = dict.fromkeys(COUNTERS, 0)
            for name, amount in increments.items():
                counters[name] += amount
            self.dirty = True

    def snapshot(self) -> dict[str, dict[str, float]]:
        """The counters if any changed since the last snapshot, else ``{}``."""
        with self._lock:
            self._forked()
            if not self.dirty:
                return {}
            self.dirty = False
            return {tool: dict(counters) for tool, counters in self._tools.items()}


_ALL: weakref.WeakSet[Stats] = weakref.WeakSet()


def _after_fork() -> None:
    for stats in list(_ALL):  # a parent's store thread may have held it: not ours
        stats.flushing = threading.Lock()


at_fork_in_child(_after_fork)


def damage(counters: object) -> str | None:
    """Why a stored row of counters cannot be added up (edited or damaged), or ``None``."""
    if not isinstance(counters, dict):
        return f"{type(counters).__name__}, not an object of counters"
    for name in COUNTERS:
        value = counters.get(name, 0)
        if type(value) not in (int, float) or not math.isfinite(value):
            return f"counter {name!r} holds {value!r:.40}"
    return None


def summarize(
    rows: Iterable[tuple[str, str, Mapping[str, float]]], *, db_path: str, run_id: str | None
) -> dict[str, Any]:
    """Add up ``(run_id, tool, counters)`` rows into the summary dict ``summary()`` returns;
    a damaged row is a :class:`StoreError` naming it."""
    from .models import StoreError

    tools: dict[str, dict[str, float]] = {}
    runs: set[str] = set()
    for run, tool, counters in rows:
        why = damage(counters)
        if why is not None:
            raise StoreError(f"{db_path}: the statistics of run {run!r}, tool {tool!r} are "
                             f"damaged ({why}); the report cannot add them up")
        runs.add(run)
        total = tools.setdefault(tool, dict.fromkeys(COUNTERS, 0))
        for name in COUNTERS:
            total[name] += counters.get(name, 0)
    for counters in tools.values():
        _derive(counters)
    totals: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    for counters in tools.values():
        for name in COUNTERS:
            totals[name] += counters[name]
    _derive(totals)
    for name in _AMOUNTS:
        totals[name] = round(totals[name], 6)
    totals.update(tools=dict(sorted(tools.items())), db_path=db_path, run_id=run_id,
                  runs=sorted(runs))
    return totals


def _derive(counters: dict[str, Any]) -> None:
    for name in COUNTERS:
        if name not in _AMOUNTS:
            counters[name] = int(counters[name])
    counters["unique_executions"] = counters["executed"]
    counters["avoided_calls"] = counters["cache_hits"] + counters["shared_waits"]
