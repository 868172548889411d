"""Worker functions for ``test_processes.py``.

They live in an importable module so that processes started with the "spawn" method
can find them. Each real execution of a tool appends one line to a log file opened
with ``O_APPEND`` (one ``write`` per line, so lines of several processes never mix):
that is how the tests count executions across processes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from singleflight_agents import SharedExecutionError, Singleflight, ToolExecutionOptions
from singleflight_agents.store import SQLiteStore

# What `tool` does in this process; each worker sets it before calling.
CONFIG: dict[str, Any] = {"log": None, "db": None, "behaviour": "return"}


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


# -- a store that tells when its caller starts waiting for another process ---------


class SignallingStore(SQLiteStore):
    """An :class:`SQLiteStore` that sets ``waiting`` each time a caller blocks on another
    process's lease (the one place a cross-process waiter goes to sleep)."""

    def __init__(self, path: str, waiting: Any) -> None:
        super().__init__(path)
        self._waiting = waiting

    def wait(self, key: str, timeout: float) -> None:
        self._waiting.set()
        super().wait(key, timeout)


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


def _lease_rows(db: str) -> list[list[Any]]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute("SELECT fingerprint, token, state, expires_at FROM leases").fetchall()
    finally:
        conn.close()
    return [list(row) for row in rows]


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
        extra["lease_at_start"] = _lease_rows(CONFIG["db"])
        time.sleep(CONFIG["work_seconds"])
        extra["lease_at_end"] = _lease_rows(CONFIG["db"])
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


def grid_worker(idx: int, db: str, log: str, keys: list[str], mode: str, barrier: Any,
                queue: Any) -> None:
    """Call every key concurrently (asyncio tasks or threads) once the barrier opens."""
    CONFIG.update(log=log, db=db)

    def body(out: dict[str, Any]) -> None:
        out["idx"] = idx
        barrier.wait(60)
        sf = Singleflight(db, run_id="grid")  # 8 processes open the fresh store at once
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
    CONFIG.update(log=spec["log"], db=spec["db"], behaviour=spec["behaviour"], started=started,
                  go=go, work_seconds=spec.get("work_seconds", 1.0), t_raise=None)

    def body(out: dict[str, Any]) -> None:
        sf = (Singleflight(store=SignallingStore(spec["db"], waiting)) if waiting is not None
              else Singleflight(spec["db"]))
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
        sf.close()

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
