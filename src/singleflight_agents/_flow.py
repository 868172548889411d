"""Every decision of a call, in one place for both drivers (:mod:`._drive`): a first look
(:func:`begin`) that settles a warm hit at once, then one generator for the rest.

A shared call goes: a receipt already stored -> the flight of this process (join it, or own
it) -> the store's lease (hold it, or wait for its holder) -> run the tool and store its
receipt. Each fallback (the store failed, the wait timed out, the call re-entered its own
run, a sync call would block the loop its owner needs) is decided here, once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _accounting, _receipts
from ._call import Call, Result
from ._drive import RUN, Detach, Escaped, Io, Steps, WaitFlight, WaitStore, running_loop
from .flights import ABANDONED, FLIGHTS, RUNNING, Flight, WaitTimeout
from .models import ExecutionOutcome, ReplayMissError, SharedExecutionError, Source, StoreError
from .store.base import Busy, Lease

if TYPE_CHECKING:
    from .engine import Singleflight


def begin(sf: Singleflight, call: Call) -> ExecutionOutcome | Steps[ExecutionOutcome]:
    """The call's outcome if its first look settles it (a receipt: no generator, no driver on
    a warm hit), else the steps that carry it out. Counted either way."""
    started = time.perf_counter()
    try:
        start = _start(sf, call)
    except BaseException:
        _raised(sf, call)
        raise
    if isinstance(start, Result):
        return _accounting.finish(sf, call, start, started)
    return _flow(sf, call, start, started)


def first_look(sf: Singleflight, call: Call) -> Steps[ExecutionOutcome | Steps[ExecutionOutcome]]:
    """:func:`begin` as one store step: for an async call whose first look may wait on a
    server, so that its event loop does not."""
    got: ExecutionOutcome | Steps[ExecutionOutcome] = yield Io(begin, sf, call)
    return got


def _flow(sf: Singleflight, call: Call, start: Source | None,
          started: float) -> Steps[ExecutionOutcome]:
    try:
        result = yield from _result(sf, call, start)
    except BaseException:
        _raised(sf, call)
        raise
    return _accounting.finish(sf, call, result, started)


def _raised(sf: Singleflight, call: Call) -> None:
    sf._stats.add(call.tool_name, calls=1, raised=1, tampered=int(call.tampered))


def _result(sf: Singleflight, call: Call, start: Source | None) -> Steps[Result]:
    if isinstance(start, Source):
        return (yield from _unshared(start))
    assert call.flight_key is not None  # set by _start for every shared call
    while True:
        flight, owner = FLIGHTS.join(call.flight_key)
        if owner:
            if call.loop is not None and not call.is_async:
                # A sync tool's owner runs in a thread of its own: cancelling an async caller
                # cannot stop the tool, so it must not stop what lands and stores its result.
                result: Result = yield Detach(_owning(sf, call, flight))
                return result
            flight.loop = call.loop
            return (yield from _owning(sf, call, flight))
        reason, topic = _why_not_wait(call, flight), ""
        if reason is None:
            try:
                landed = yield WaitFlight(flight, call.options.wait_timeout_seconds)
            except WaitTimeout:
                reason = "waiting for it timed out"
            else:
                if landed is ABANDONED:  # the owner was cancelled: take the flight over
                    continue
                # A copy of the waiter's own, or why there is none (then it runs the tool)
                mine = landed if isinstance(landed, str) else _receipts.as_waiter(landed)
                if isinstance(mine, Result):
                    return mine
                reason, topic = mine, _accounting.UNSHAREABLE
        _accounting.note_fallback(sf, call, reason, topic)
        return (yield from _unshared(Source.EXECUTED_FALLBACK))


def _why_not_wait(call: Call, flight: Flight) -> str | None:
    if flight.key in RUNNING.get():
        return "it was called again, with the same arguments, by its own run"
    if call.loop is None and flight.loop is not None and flight.loop is running_loop():
        return "its owner runs on the event loop this sync call blocks"
    return None


def _start(sf: Singleflight, call: Call) -> Result | Source | None:
    """Before any flight: a result to return, the source to run the tool under without
    sharing, or ``None`` to join the flight."""
    if not call.options.shared:
        if call.mode == "replay" and not call.options.side_effecting:
            raise miss(sf, call)  # undeclared: replay neither serves nor runs it
        return Source.EXECUTED_UNSHARED
    backend = sf._backend
    if backend is None:
        # A store or key that cannot be opened is a setting to fix, not a passing failure to
        # run through: it raises, as it did when stores were opened at construction.
        backend = sf._open(replay=call.mode == "replay")
    call.flight_key = (backend.store.identity, call.key)
    call.inline_io = backend.store.runs_on_loop
    if _off(sf, call):
        return Source.EXECUTED_UNSHARED
    try:
        if call.mode == "replay":
            hit = _receipts.lookup(sf, call)
            if hit is None:
                raise miss(sf, call)
            return hit
        if FLIGHTS.peek(call.flight_key) is not None:
            return None
        return _receipts.lookup(sf, call)
    except StoreError as exc:  # no use asking the store again: run it now
        if call.mode == "replay":
            raise  # replay never runs a shared tool
        _accounting.note_fallback(sf, call, f"the store failed: {exc}")
        return Source.EXECUTED_FALLBACK


def _unshared(source: Source) -> Steps[Result]:
    started = time.perf_counter()
    value = yield RUN
    return Result(value, source, latency_ms=(time.perf_counter() - started) * 1000)


def _owning(sf: Singleflight, call: Call, flight: Flight) -> Steps[Result]:
    """The owner's part: the result, landed for every waiter of the flight."""
    try:
        result = yield from _resolve(sf, call)
        # Never the owner's own object: an awaitable or iterator would be used twice, and a
        # mutable value changed by one caller under another.
        landing = _receipts.for_waiters(result)
    except BaseException as exc:
        # The tool's own errors reach every waiter; a cancelled or interrupted owner
        # (CancelledError, KeyboardInterrupt, ...) hands the flight to a waiter instead.
        error = exc.original if isinstance(exc, Escaped) else exc
        FLIGHTS.land(flight.key, flight, error if isinstance(exc, Exception) else ABANDONED)
        raise
    FLIGHTS.land(flight.key, flight, landing)
    return result


def _resolve(sf: Singleflight, call: Call) -> Steps[Result]:
    try:
        got = yield from _get_lease(sf, call)
    except StoreError as exc:
        got = f"the store failed: {exc}"
    if isinstance(got, Lease):
        return (yield from _run_holding(sf, call, got))
    if isinstance(got, Result):
        return got
    _accounting.note_fallback(sf, call, got)
    return (yield from _unshared(Source.EXECUTED_FALLBACK))


def _get_lease(sf: Singleflight, call: Call) -> Steps[Lease | Result | str]:
    """The lease, a result someone else produced meanwhile, or why neither came."""
    options = call.options
    deadline = time.monotonic() + options.wait_timeout_seconds
    # No look before the first acquire: the fast path has just looked, and a holder looks
    # again once it has the lease (_run_holding). After a wait, the result is theirs.
    while True:
        attempt: Lease | Busy = yield Io(sf.store.acquire, call.key, sf._owner,
                                         options.lease_seconds, undo=_give_back(sf))
        if isinstance(attempt, Lease):
            return attempt
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "waiting for another process timed out"
        yield WaitStore(sf.store, remaining)
        hit: Result | None = yield Io(_receipts.lookup, sf, call)
        if hit is not None:
            hit.source = Source.SHARED_WAIT
            return hit
        if options.share_failures:
            failure = yield Io(sf.store.last_failure, call.key)
            if failure is not None and failure.token >= attempt.since_token:
                raise SharedExecutionError(call.tool_name, failure.error_type, failure.message)


def _give_back(sf: Singleflight) -> Callable[[Lease | Busy], None]:
    def give_back(attempt: Lease | Busy) -> None:
        if isinstance(attempt, Lease):
            sf.store.release(attempt)

    return give_back


def _run_holding(sf: Singleflight, call: Call, lease: Lease) -> Steps[Result]:
    try:
        return (yield from _holding(sf, call, lease))
    except GeneratorExit as exc:  # abandoned (its driver is gone): no step can follow
        _receipts.release_failed(sf, call, lease, exc)
        raise


def _holding(sf: Singleflight, call: Call, lease: Lease) -> Steps[Result]:
    with sf._heartbeat.hold(lease):
        try:
            # A holder may have finished since our last look.
            hit: Result | None = yield Io(_receipts.lookup, sf, call)
        except StoreError:
            hit = None  # the store just failed: run the tool; storing it will warn
        if hit is not None:
            with contextlib.suppress(StoreError):
                yield Io(sf.store.release, lease)
            return hit
        try:
            started = time.perf_counter()
            value = yield RUN
        except GeneratorExit:
            raise  # see _run_holding
        except BaseException as exc:
            yield Io(_receipts.release_failed, sf, call, lease, exc)
            raise
    latency_ms = (time.perf_counter() - started) * 1000
    # Counted here, not per caller: the run happened even if its caller was cancelled.
    sf._stats.add(call.tool_name, executed=1, takeovers=int(lease.takeover))
    result = Result(value, Source.EXECUTED, latency_ms=latency_ms, takeover=lease.takeover)
    yield Io(_receipts.persist, sf, call, result, lease)
    return result


def miss(sf: Singleflight, call: Call) -> ReplayMissError:
    sf._stats.add(call.tool_name, replay_misses=1)
    session = call.session
    error = ReplayMissError(
        call.tool_name, call.shown_inputs,
        sf.record_command if session is None else session.record_command_now(),
        undeclared=not call.options.shared, tampered=call.tampered)
    if session is not None:
        session.missed(error)  # fails its test even if the agent swallows it
    return error


def _off(sf: Singleflight, call: Call) -> bool:
    """In mode="off", count the call if an earlier one had the same key."""
    if call.mode != "off":
        return False
    try:  # kept in the store, so that every process of the run counts alike
        repeated = not sf.store.first_call(sf.run_id, call.key)
    except StoreError:
        repeated = False  # a count is not worth failing the call for
    if repeated:
        call.duplicate = True
        sf._stats.add(call.tool_name, duplicates=1,
                      duplicate_dollars=call.options.estimated_cost_usd)
    return True
