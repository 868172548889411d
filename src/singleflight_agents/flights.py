"""The in-process flight table: one owner per key, everyone else waits on its future.

Go's ``singleflight.Group`` for threads and event loops at once: the future is a
``concurrent.futures.Future`` (bound to no loop), so sync callers block on it and async
callers on any loop await it without polling and without a thread each.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import TYPE_CHECKING, Any

from ._platform import at_fork_in_child

if TYPE_CHECKING:  # imported lazily: asyncio alone doubles the package's import time
    import asyncio
    import concurrent.futures

ABANDONED = object()  # the owner was cancelled: a waiter should take the flight over
# The flights whose tools run in this context. Tasks (gather, TaskGroup) and threads started
# with the context (asyncio.to_thread, LangChain's executors) inherit it: a tool that calls
# itself with the same arguments from one of them is told apart from an ordinary waiter.
RUNNING: contextvars.ContextVar[frozenset[tuple[str, str]]] = contextvars.ContextVar(
    "singleflight_running", default=frozenset())


@contextlib.contextmanager
def running(key: tuple[str, str] | None) -> Any:
    """Mark ``key``'s tool as running in this context (and those it hands on) while inside;
    an unshared call (``None``) marks nothing."""
    if key is None:
        yield
        return
    token = RUNNING.set(RUNNING.get() | {key})
    try:
        yield
    finally:
        RUNNING.reset(token)


class WaitTimeout(Exception):
    """The engine's own wait ran out; never a tool's ``TimeoutError``, which waiters share."""


class Flight:
    __slots__ = ("future", "key", "loop")

    def __init__(self, key: tuple[str, str]) -> None:
        from concurrent.futures import Future

        self.key = key
        self.future: concurrent.futures.Future[Any] = Future()
        # The event loop an async owner runs on: a sync waiter on that loop's thread
        # would block the very loop the owner needs.
        self.loop: asyncio.AbstractEventLoop | None = None


class FlightTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[tuple[str, str], Flight] = {}

    def peek(self, key: tuple[str, str]) -> Flight | None:
        return self._flights.get(key)

    def join(self, key: tuple[str, str]) -> tuple[Flight, bool]:
        """The flight for ``key`` and whether the caller now owns it."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None and flight.loop is not None and flight.loop.is_closed():
                stale, flight = flight, None  # its owner's loop is gone: it can never land
            else:
                stale = None
            if flight is None:
                flight = self._flights[key] = Flight(key)
                owner = True
            else:
                owner = False
        if stale is not None:
            self._resolve(stale, ABANDONED)
        return flight, owner

    def land(self, key: tuple[str, str], flight: Flight, result: Any) -> None:
        """End the flight: later callers start afresh, waiters get ``result``."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        self._resolve(flight, result)

    @staticmethod
    def _resolve(flight: Flight, result: Any) -> None:
        if flight.future.done():  # abandoned already, because its loop closed
            return
        if isinstance(result, BaseException):
            flight.future.set_exception(result)
        else:
            flight.future.set_result(result)

    def clear(self) -> None:
        self._lock = threading.Lock()
        self._flights = {}


FLIGHTS = FlightTable()
at_fork_in_child(FLIGHTS.clear)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def wait_future(future: concurrent.futures.Future[Any], timeout: float | None) -> Any:
    """Await ``future`` from any loop. Cancelling the awaiting task leaves ``future`` alone
    (``asyncio.wrap_future`` would cancel it for every other waiter too)."""
    import asyncio

    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_resolve, waiter)

    future.add_done_callback(wake)
    try:
        await asyncio.wait_for(waiter, timeout)
    except TimeoutError:
        raise WaitTimeout from None
    return future.result()  # the tool's own exceptions, TimeoutError included, as they are


def wait_sync(future: concurrent.futures.Future[Any], timeout: float | None) -> Any:
    """``future.result(timeout)``, with the wait's end told apart from the tool's errors."""
    from concurrent.futures import wait

    if not wait([future], timeout).done:
        raise WaitTimeout
    return future.result()


def start_thread(func: Any, *args: Any, name: str = "singleflight-call") -> Any:
    """Run ``func`` in a new thread (unlike the default executor, never starved); its
    result or exception arrives in the returned ``concurrent.futures.Future``."""
    from concurrent.futures import Future

    future: concurrent.futures.Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(func(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


_STORE_THREADS = 8
_store_pool: concurrent.futures.ThreadPoolExecutor | None = None
_store_pool_lock = threading.Lock()


def store_thread(func: Any, *args: Any) -> concurrent.futures.Future[Any]:
    """Run ``func(*args)`` in one of a few threads kept for store operations (each bounded
    by the store's own timeouts), started on first use and anew in a forked child."""
    global _store_pool
    pool = _store_pool
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        with _store_pool_lock:
            if _store_pool is None:
                _store_pool = ThreadPoolExecutor(
                    _STORE_THREADS, thread_name_prefix="singleflight-store")
            pool = _store_pool
    return pool.submit(func, *args)


def _forget_store_pool() -> None:
    global _store_pool, _store_pool_lock
    _store_pool, _store_pool_lock = None, threading.Lock()  # its threads are the parent's


at_fork_in_child(_forget_store_pool)


async def run_in_thread(func: Any, *args: Any, name: str = "singleflight-call") -> Any:
    """Await ``func(*args)`` run by :func:`start_thread`, in a copy of this context (as
    ``asyncio.to_thread``): a tool running here is known as running there too."""
    context = contextvars.copy_context()
    return await wait_future(start_thread(context.run, func, *args, name=name), None)
