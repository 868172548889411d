"""Code that runs in spawned peer processes, and ``Peer``, the parent's handle on one.

Every cross-process benchmark uses the *spawn* start method, so a peer is a fresh
interpreter like a real second agent process. A child finds this module by plain name
because it inherits the parent's ``sys.path``, which has bench/ on it (see run.py).
Clocks across processes are compared with ``time.time()`` (one machine, one clock).

Every process opens its store by URL (a file path or ``redis://...?prefix=``) with the
benchmark's secret (``common.open_engine``). The tools get explicit tool names, so that
every process fingerprints them alike.
``ROLE`` says whether a ``serve`` process is the holder (it runs the slow path and reports
"started" as soon as its tool begins) or a waiter (its tool runs only if it has to take
over or re-execute).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from common import open_engine, payload

from singleflight_agents import ToolExecutionOptions

SPAWN = multiprocessing.get_context("spawn")
HOLD_S = 0.1  # how long a holder runs its tool before finishing or failing

ROLE = "waiter"
CONN: Any = None  # this process's end of the pipe to the parent
STATE: dict[str, float] = {}  # times a tool recorded during the current call


def _started() -> None:
    STATE["t_start"] = time.time()
    if ROLE == "holder":
        CONN.send(("started", STATE["t_start"]))


def wake_tool(key: str) -> str:
    _started()
    if ROLE == "holder":
        time.sleep(HOLD_S)
    STATE["t_end"] = time.time()
    return key


async def wake_tool_async(key: str) -> str:
    _started()
    if ROLE == "holder":
        await asyncio.sleep(HOLD_S)
    STATE["t_end"] = time.time()
    return key


def crash_tool(key: str) -> str:
    _started()
    if ROLE == "holder":
        time.sleep(3600)  # until SIGKILLed
    return key


def fail_tool(key: str) -> str:
    _started()
    if ROLE == "holder":
        time.sleep(HOLD_S)
        STATE["t_raise"] = time.time()
        raise RuntimeError("the holder's tool failed")
    return key


TOOLS: dict[str, tuple[str, Callable[..., Any]]] = {
    "wake": ("bench.wake", wake_tool),
    "wake_async": ("bench.wake", wake_tool_async),  # same tool as "wake", async flavour
    "crash": ("bench.crash", crash_tool),
    "fail": ("bench.fail", fail_tool),
}


def serve(role: str, url: str, conn: Any) -> None:
    """A peer process: runs ("call", tool, key, mode, options) commands until "stop".

    For each call it sends ("calling", time) and then ("result", report), the report
    holding the outcome's source, takeover flag or error name, the time the caller had
    the result (t_got) and the times the tool recorded in ``STATE``.
    """
    global ROLE, CONN
    ROLE, CONN = role, conn
    sf = open_engine(url)
    conn.send(("ready", os.getpid()))
    while (message := conn.recv())[0] != "stop":
        _, tool_id, key, mode, extra = message
        tool_name, func = TOOLS[tool_id]
        options = ToolExecutionOptions(deterministic=True, tool_name=tool_name, **extra)
        STATE.clear()
        conn.send(("calling", time.time()))
        report: dict[str, Any] = {"source": None, "takeover": None, "error": None}
        try:
            if mode == "sync":
                outcome = sf.execute_sync(func, key, options=options)
            else:
                outcome = asyncio.run(sf.execute(func, key, options=options))
            report.update(t_got=time.time(), source=str(outcome.source),
                          takeover=outcome.takeover)
        except Exception as exc:
            report.update(t_got=time.time(), error=type(exc).__name__)
        conn.send(("result", {**report, **STATE}))
    sf.close()


class Peer:
    """A spawned ``serve`` process on store ``url`` and our end of its pipe. Unless ``wait``
    is false, the constructor waits for the process to be ready (else: ``started()``)."""

    def __init__(self, role: str, url: str, wait: bool = True) -> None:
        self.conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(target=serve, args=(role, url, child), daemon=True)
        self.process.start()
        child.close()
        if wait:
            self.started()

    @staticmethod
    def all_started(*peers: Peer) -> None:
        """Wait until every one of ``peers`` (created with ``wait=False``) is ready: they
        start side by side, in less time than one after the other."""
        for peer in peers:
            peer.started()

    def started(self) -> None:
        self.expect("ready", timeout=60)

    def call(self, tool_id: str, key: str, mode: str = "sync", **options: Any) -> None:
        self.conn.send(("call", tool_id, key, mode, options))

    def expect(self, kind: str, timeout: float = 30) -> Any:
        """The payload of the next message of ``kind``; earlier kinds are skipped."""
        deadline = time.monotonic() + timeout
        while self.conn.poll(max(0.0, deadline - time.monotonic())):
            got, message = self.conn.recv()
            if got == kind:
                return message
        raise TimeoutError(f"peer {self.process.pid}: no {kind!r} within {timeout} s")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # type: ignore[arg-type]
        self.process.join()


def busy_writer(url: str, conn: Any) -> None:
    """Store new receipts in a loop until the parent says stop; then send how many."""
    sf = open_engine(url)
    options = ToolExecutionOptions(deterministic=True, tool_name="bench.writer")
    conn.send("ready")
    stored = 0
    while not conn.poll():
        sf.execute_sync(payload, 1_000_000_000 + stored, options=options)
        stored += 1
    conn.send(stored)
    sf.close()


# The store calls an async caller makes on the event loop's thread (``wait`` runs in a worker
# thread, ``renew`` in the heartbeat thread).
STORE_CALLS = ("get", "acquire", "put", "release", "last_failure", "save_stats")


def _blocking_time(obj: Any, methods: tuple[str, ...]) -> list[int]:
    """Time every call of ``obj``'s ``methods`` (shadowed on the instance) made on a thread
    that runs an event loop, i.e. time that loop spent blocked: [total ns]. Calls the engine
    makes in its store threads do not block a loop and are not counted."""
    total = [0]
    lock = threading.Lock()
    for name in methods:
        original = getattr(obj, name)

        def timed(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if asyncio._get_running_loop() is None:
                return _original(*args, **kwargs)
            start = time.perf_counter_ns()
            try:
                return _original(*args, **kwargs)
            finally:
                with lock:
                    total[0] += time.perf_counter_ns() - start

        setattr(obj, name, timed)
    return total


def fanout_worker(conn: Any) -> None:
    """One of the processes of "processes x keys", for several runs: each ("run", url,
    log_path, keys) is one ``fanout_run``; ("stop",) ends the process."""
    while (message := conn.recv())[0] == "run":
        fanout_run(conn, *message[1:])


def fanout_run(conn: Any, url: str, log_path: str, keys: list[str], tool_s: float = 0.02,
               tool_name: str = "bench.mp_fanout") -> None:
    """Open the store, say ("ready", pid), wait for the start instant the parent sends,
    call every key at once, and send ("done", time, blocked seconds), where blocked is how
    long the event loop spent inside the store's calls.

    Each execution appends a line to ``log_path`` (O_APPEND, so lines from the processes
    don't mix), which the parent counts.
    """
    sf = open_engine(url)
    options = ToolExecutionOptions(deterministic=True, tool_name=tool_name)
    blocked_ns = _blocking_time(sf.store, STORE_CALLS)

    async def tool(key: str) -> str:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{time.time()} {os.getpid()} {key}\n".encode())
        finally:
            os.close(fd)
        await asyncio.sleep(tool_s)
        return key

    async def all_keys() -> None:
        await asyncio.gather(*(sf.execute(tool, key, options=options) for key in keys))

    conn.send(("ready", os.getpid()))
    start_at = conn.recv()
    time.sleep(max(0.0, start_at - time.time()))
    asyncio.run(all_keys())
    conn.send(("done", time.time(), blocked_ns[0] / 1e9))
    sf.close()
