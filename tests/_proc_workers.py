"""Worker functions for ``test_processes.py``.

They live in an importable module so that processes started with the "spawn" method
can find them. Every worker gets the store URL (an SQLite path or a ``redis://`` URL)
and the secret, and opens its own engine. Each real execution of a tool appends one
line to a log file opened with ``O_APPEND`` (one ``write`` per line, so lines of
several processes never mix): that is how the tests count executions across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from singleflight_agents import SharedExecutionError, Singleflight, StoreError, ToolExecutionOptions
from singleflight_agents.store import REDIS_SCHEMES, ReceiptStore, SQLiteStore, sqlite_path
from singleflight_agents.store._liveness import platform_lock

# What `tool` does in this process; each worker sets it before calling.
CONFIG: dict[str, Any] = {"log": None, "store": None, "behaviour": "return"}


def is_redis(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


# -- the execution log -------------------------------------------------------------


def log_line(log: str, tag: str, key: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag} {os.getpid()} {key} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def read_log(log: str, tag: str = "run") -> list[tuple[int, str, float]]:
    """``(pid, key, unix time)`` of every line tagged ``tag``."""
    try:
        with open(log) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        got, pid, key, at = line.split(" ")
        if got == tag:
            rows.append((int(pid), key, float(at)))
    return rows


# -- raw looks at a store's leases, the same on both backends ----------------------


def lease_rows(store: ReceiptStore) -> list[list[Any]]:
    """``[fingerprint, token, state, expires (Unix seconds)]`` of every lease (what
    ``_backdoor.lease_expiries`` reads, with the token and state beside it)."""
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path, timeout=30)
        try:
            rows = conn.execute("SELECT fingerprint, token, state, expires_at FROM leases").fetchall()
        finally:
            conn.close()
        return [list(row) for row in rows]
    client, prefix = store._redis, store.prefix  # type: ignore[attr-defined]
    found = []
    for name in client.scan_iter(match=f"{prefix}l:*"):
        token, state, expires = client.hmget(name, ["token", "state", "expires"])
        found.append([name.removeprefix(f"{prefix}l:"), int(token), state, int(expires) / 1000])
    return found


def has_liveness_lock() -> bool:
    """Whether an SQLite holder's death is seen at once (a lock the kernel releases), or
    only when its lease lapses, as on Redis."""
    return platform_lock() is not None


def steal_leases(store: ReceiptStore) -> int:
    """Make every lease in the store takeable while its holder still runs, the one way
    each backend can lose a live holder's lease: SQLite loses the lock file (deleted, as
    a cleanup script might); Redis sees the lease lapse (as after a long pause of its
    holder). Returns how many leases were stolen."""
    if isinstance(store, SQLiteStore) and not has_liveness_lock():  # leases lapse instead
        with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
            return conn.execute("UPDATE leases SET expires_at = 0 WHERE state = 'held'").rowcount
    if isinstance(store, SQLiteStore):
        lock_files = list(Path(f"{store.path}.locks").iterdir())
        for lock_file in lock_files:
            lock_file.unlink()
        return len(lock_files)
    client, prefix = store._redis, store.prefix  # type: ignore[attr-defined]
    names = list(client.scan_iter(match=f"{prefix}l:*"))
    for name in names:
        client.hset(name, "expires", 0)
    return len(names)


# -- a store that tells when its caller starts waiting for another process ---------


class _Signalling:
    """Mixed into a store class: ``waiting`` is set each time a caller blocks on another
    process's lease (the one place a cross-process waiter goes to sleep)."""

    _waiting: Any

    def wait(self, key: str, timeout: float) -> None:
        self._waiting.set()
        super().wait(key, timeout)  # type: ignore[misc]


def signalling_store(url: str, waiting: Any) -> ReceiptStore:
    """The store ``url`` names, of a subclass whose ``wait`` sets ``waiting`` first."""
    base: type[ReceiptStore]
    if is_redis(url):
        from singleflight_agents.store.redis import RedisStore

        base, arg = RedisStore, url
    else:
        base, arg = SQLiteStore, str(sqlite_path(url))
    cls = type(f"Signalling{base.__name__}", (_Signalling, base), {})
    store: Any = cls(arg)
    store._waiting = waiting
    return store  # type: ignore[no-any-return]


def open_engine(spec: dict[str, Any], waiting: Any = None, run_id: str | None = None) -> Singleflight:
    store: str | ReceiptStore = (spec["store"] if waiting is None
                                 else signalling_store(spec["store"], waiting))
    return Singleflight(store=store, secret=spec["secret"], run_id=run_id)


# -- tools -------------------------------------------------------------------------

GRID_TOOL = "procs.grid"


def grid_sync(key: str) -> dict[str, Any]:
    log_line(CONFIG["log"], "run", key)
    time.sleep(0.02)  # simulated work, so that callers overlap
    return {"key": key, "upper": key.upper(), "by": os.getpid()}


async def grid_async(key: str) -> dict[str, Any]:
    log_line(CONFIG["log"], "run", key)
    await asyncio.sleep(0.02)
    return {"key": key, "upper": key.upper(), "by": os.getpid()}


def tool(key: str) -> dict[str, Any]:
    """Behaves as ``CONFIG["behaviour"]`` says; always logs its start first."""
    behaviour = CONFIG["behaviour"]
    log_line(CONFIG["log"], "run", key)
    started = CONFIG.get("started")
    if started is not None:
        started.set()
    extra: dict[str, Any] = {}
    if behaviour == "block":  # until killed
        threading.Event().wait()
    elif behaviour == "slow":  # simulated work ~3x longer than the lease
        extra["lease_at_start"] = lease_rows(CONFIG["store"])
        time.sleep(CONFIG["work_seconds"])
        extra["lease_at_end"] = lease_rows(CONFIG["store"])
        extra["end"] = time.time()
    elif behaviour == "gate":  # until the test opens the gate
        if not CONFIG["go"].wait(30):
            raise RuntimeError("the gate never opened")
    elif behaviour == "fail":
        if not CONFIG["go"].wait(30):
            raise RuntimeError("the gate never opened")
        CONFIG["t_raise"] = time.time()
        raise ValueError(f"boom for {key}")
    return {"key": key, "by": os.getpid(), **extra}


# -- workers -----------------------------------------------------------------------


def _report(queue: Any, body: Callable[[dict[str, Any]], None]) -> None:
    out: dict[str, Any] = {"pid": os.getpid(), "crash": None, "warnings": []}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            body(out)
        out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    except BaseException:
        out["crash"] = traceback.format_exc()
    queue.put(out)


def grid_worker(idx: int, spec: dict[str, Any], keys: list[str], mode: str, barrier: Any,
                queue: Any) -> None:
    """Call every key concurrently (asyncio tasks or threads) once the barrier opens."""
    CONFIG.update(log=spec["log"])

    def body(out: dict[str, Any]) -> None:
        out["idx"] = idx
        barrier.wait(60)
        sf = open_engine(spec, run_id="grid")  # on SQLite, 8 processes open a fresh file at once
        opts = ToolExecutionOptions(tool_name=GRID_TOOL, deterministic=True)
        order = keys[idx % len(keys):] + keys[: idx % len(keys)]
        if mode == "async":
            async def main() -> list[Any]:
                return await asyncio.gather(*(sf.execute(grid_async, k, options=opts)
                                              for k in order))
            outcomes = asyncio.run(main())
        else:
            with ThreadPoolExecutor(len(order)) as pool:
                outcomes = list(pool.map(
                    lambda k: sf.execute_sync(grid_sync, k, options=opts), order))
        out["outcomes"] = [(k, o.value, str(o.source), o.takeover)
                           for k, o in zip(order, outcomes, strict=True)]
        sf.close()

    _report(queue, body)


def call_worker(spec: dict[str, Any], queue: Any, started: Any = None, go: Any = None,
                waiting: Any = None, barrier: Any = None) -> None:
    """One ``execute_sync`` of ``tool(spec["key"])``; reports outcome, error and times."""
    CONFIG.update(log=spec["log"], behaviour=spec["behaviour"], started=started, go=go,
                  work_seconds=spec.get("work_seconds", 1.0), t_raise=None)

    def body(out: dict[str, Any]) -> None:
        sf = open_engine(spec, waiting)
        CONFIG["store"] = sf.store
        opts = ToolExecutionOptions(tool_name=spec.get("tool_name", "procs.tool"),
                                    deterministic=True, **spec.get("options", {}))
        if barrier is not None:
            barrier.wait(60)
        out["t_call"] = time.time()
        try:
            outcome = sf.execute_sync(tool, spec["key"], options=opts)
        except SharedExecutionError as exc:
            out["shared_error"] = {"tool_name": exc.tool_name, "error_type": exc.error_type,
                                   "error_message": exc.error_message, "text": str(exc)}
        except Exception as exc:
            out["error"] = {"type": type(exc).__name__, "text": str(exc)}
        else:
            out.update(value=outcome.value, source=str(outcome.source),
                       takeover=outcome.takeover,
                       receipt_token=outcome.receipt.token if outcome.receipt else None)
        out["t_done"] = time.time()
        out["t_raise"] = CONFIG["t_raise"]
        try:
            sf.close()
        except StoreError as exc:  # a store lost mid-run (test_redis_faults.py): reported
            out["close_error"] = str(exc)

    _report(queue, body)


def fork_child(sf: Singleflight, key: str, queue: Any) -> None:
    """Runs in a child forked from the test process, with the parent's engine."""
    CONFIG.update(behaviour="return", started=None, go=None)

    def body(out: dict[str, Any]) -> None:
        outcome = sf.execute_sync(tool, key, options=ToolExecutionOptions(
            tool_name="procs.fork", deterministic=True))
        out.update(value=outcome.value, source=str(outcome.source), takeover=outcome.takeover)
        sf.flush_stats()

    _report(queue, body)
