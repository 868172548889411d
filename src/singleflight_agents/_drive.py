"""The two drivers: they carry out the steps the decisions (:mod:`._flow`) ask for, one
blocking its thread, one awaiting on its event loop. Every decision is made in the flow;
a driver only runs the tool and waits."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .flights import (
    Flight,
    run_in_thread,
    running,
    start_thread,
    store_thread,
    wait_future,
    wait_sync,
)

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures

    from ._call import Call
    from .store import ReceiptStore

T = TypeVar("T")


class Run:
    """Run the tool; its value is sent back."""

    __slots__ = ()


class WaitStore:
    """Wait up to ``timeout`` seconds for another process's lease on the call to end."""

    __slots__ = ("store", "timeout")

    def __init__(self, store: ReceiptStore, timeout: float) -> None:
        self.store, self.timeout = store, timeout


class WaitFlight:
    """Wait up to ``timeout`` seconds for this process's owner of the call; its result
    (or :data:`~.flights.ABANDONED`) is sent back, ``WaitTimeout`` thrown in."""

    __slots__ = ("flight", "timeout")

    def __init__(self, flight: Flight, timeout: float) -> None:
        self.flight, self.timeout = flight, timeout


class Detach:
    """Drive ``steps`` to their end in a thread of their own; their result is sent back."""

    __slots__ = ("steps",)

    def __init__(self, steps: Steps[Any]) -> None:
        self.steps = steps


class Io:
    """Call ``func(*args)``, which talks to the store: in the calling thread for a sync
    caller or a store on this machine's disk (``Call.inline_io``, microseconds unless another
    process holds SQLite's write lock); for an async caller of a server's store, in a store
    thread, so that its event loop never waits on the network. (Inline, an async caller's
    parallel tools also finish in the order they would without receipts.)
    Its result is sent back, its exception thrown in; ``undo(result)`` gives back what it
    took if the flow is abandoned before it sees the result."""

    __slots__ = ("args", "func", "undo")

    def __init__(self, func: Callable[..., Any], *args: Any,
                 undo: Callable[[Any], None] | None = None) -> None:
        self.func, self.args, self.undo = func, args, undo


RUN = Run()
Step = Run | WaitStore | WaitFlight | Detach | Io
Steps = Generator[Step, Any, T]


class Escaped(Exception):
    """Carries a tool's StopIteration into the flow, which would turn it into a
    RuntimeError (PEP 479)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


class _Driving(Generic[T]):
    """Where a driver stands in the flow: what to send it next, and its result once done."""

    __slots__ = ("cancelled", "error", "reply", "result", "steps")

    def __init__(self, steps: Steps[T]) -> None:
        self.steps = steps
        self.reply: Any = None
        self.error: BaseException | None = None
        self.result: Any = None
        # A cancellation that came while an Io step ran: it is thrown in at the next step
        # that is not one, after the flow has seen what the store did (a lease it must give
        # back).
        self.cancelled: BaseException | None = None

    def next(self) -> Step | None:
        """The flow's next step, or ``None`` when it is done (its result in ``result``)."""
        error, self.error = self.error, None
        try:
            step = self.steps.throw(error) if error is not None else self.steps.send(self.reply)
        except StopIteration as stop:
            self.result = stop.value
            return None
        except Escaped as escaped:
            raise escaped.original from None
        self.reply = None
        return step

    def failed(self, exc: BaseException) -> None:
        self.error = Escaped(exc) if isinstance(exc, StopIteration) else exc


def drive_sync(call: Call, steps: Steps[T]) -> T:
    """Carry out ``steps`` blocking this thread; their result."""
    driving = _Driving(steps)
    while (step := driving.next()) is not None:
        try:
            driving.reply = _carry_out_sync(call, step)
        except BaseException as exc:
            driving.failed(exc)
    return cast(T, driving.result)


async def drive_async(call: Call, steps: Steps[T]) -> T:
    """Carry out ``steps`` on the running event loop, blocking calls in threads."""
    driving = _Driving(steps)
    while (step := driving.next()) is not None:
        if isinstance(step, Io):
            try:
                driving.reply = (step.func(*step.args) if call.inline_io
                                 else await _off_loop(driving, step))
            except BaseException as exc:
                driving.failed(exc)
            continue
        if driving.cancelled is not None:
            driving.failed(driving.cancelled)
            driving.cancelled = None
            continue
        try:
            driving.reply = await _carry_out_async(call, step)
        except BaseException as exc:
            driving.failed(exc)
    if driving.cancelled is not None:
        raise driving.cancelled
    return cast(T, driving.result)


async def _off_loop(driving: _Driving[Any], step: Io) -> Any:
    """Run an Io step in a store thread. A store operation cannot be stopped halfway: a
    cancellation waits for it to end, and is kept for the flow (``_Driving.cancelled``)."""
    import asyncio

    future = store_thread(contextvars.copy_context().run, step.func, *step.args)
    while True:
        try:
            return await wait_future(future, None)
        except asyncio.CancelledError as exc:
            if future.done() and future.exception() is exc:
                raise  # the operation's own error
            driving.cancelled = driving.cancelled or exc
        except BaseException as exc:
            if not (future.done() and future.exception() is exc):
                # The coroutine is being closed (its loop is gone) or interrupted: no
                # await can follow, and the flow will never see what the store did.
                _abandon(step, future)
            raise


def _abandon(step: Io, future: concurrent.futures.Future[Any]) -> None:
    """Wait for the store operation (bounded by the store's own timeouts) and give back
    what it took."""
    try:
        result = future.result()
    except BaseException:
        return
    if step.undo is not None:
        with contextlib.suppress(Exception):
            step.undo(result)


def _carry_out_sync(call: Call, step: Step) -> Any:
    if isinstance(step, Io):
        return step.func(*step.args)
    if isinstance(step, Run):
        with running(call.flight_key):
            return call_tool(call)
    if isinstance(step, WaitStore):
        return step.store.wait(call.key, step.timeout)
    if isinstance(step, WaitFlight):
        return wait_sync(step.flight.future, step.timeout)
    return drive_sync(call, step.steps)  # this thread may block: detached steps run right here


async def _carry_out_async(call: Call, step: Step) -> Any:
    if isinstance(step, Run):
        with running(call.flight_key):
            if not call.is_async:
                return await run_in_thread(call_tool, call)
            value = call.invoke()
            return (await value) if inspect.isawaitable(value) else value
    if isinstance(step, WaitStore):
        return await run_in_thread(step.store.wait, call.key, step.timeout)
    if isinstance(step, WaitFlight):
        return await wait_future(step.flight.future, step.timeout)
    assert isinstance(step, Detach)
    return await run_in_thread(drive_sync, call, step.steps, name="singleflight-owner")


def call_tool(call: Call) -> Any:
    """Run the tool from sync code: its value, never a coroutine."""
    value = call.invoke()
    # An async tool, or a sync callable that hands one back (a wrapper, a lambda): its
    # result is what the coroutine returns, never the coroutine itself.
    if not inspect.iscoroutine(value):
        return value
    import asyncio

    if running_loop() is None:
        return asyncio.run(value)
    # This thread runs a loop we must not re-enter: give the coroutine its own.
    # The loop's thread gets this context: a flight running here is known there too.
    context = contextvars.copy_context()
    return start_thread(context.run, asyncio.run, value, name="singleflight-loop").result()


def running_loop() -> asyncio.AbstractEventLoop | None:
    if "asyncio" not in sys.modules:  # no loop can run without asyncio imported
        return None
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
