"""The engine: one execution per fingerprint among every caller sharing a store.

A call goes: fingerprint -> in-process flight table -> store receipt -> store lease ->
run the tool (see docs/how-it-works.md). The decisions live in one generator,
``_resolve``, which yields the two things that differ between sync and async code
(run the tool, wait for another process); ``_drive_sync`` and ``_drive_async`` are
the two thin entries that carry those out.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import math
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from . import codec
from .fingerprint import binder, check_redact, encode_inputs, fingerprint_of, shown_inputs
from .flights import (
    ABANDONED,
    FLIGHTS,
    RUNNING,
    Flight,
    WaitTimeout,
    run_in_thread,
    running,
    start_thread,
    wait_future,
    wait_sync,
)
from .heartbeat import Heartbeat
from .models import (
    ExecutionOutcome,
    Receipt,
    ReplayMissError,
    SharedExecutionError,
    Source,
    StoreError,
    ToolExecutionOptions,
    check_mode,
    check_text,
)
from .pricing import PriceSource, PriceTable
from .sessions import (
    DEFAULT_RECORD_COMMAND,
    ENV_RUN_ID,
    Session,
    active_session,
    check_replayable,
    new_run_id,
)
from .signing import Signer, key_path_for, load_key
from .stats import Stats, summarize
from .store import ReceiptStore, SQLiteStore, is_sqlite_url, open_store, sqlite_path
from .store.base import Lease

if TYPE_CHECKING:  # imported where used: most imports of the package never need asyncio
    import asyncio

F = TypeVar("F", bound=Callable[..., Any])
_FLUSH_INTERVAL = 1.0


# Plain classes, not dataclasses: each dataclass costs milliseconds at import.


class _Call:
    __slots__ = ("args", "duplicate", "func", "inputs", "is_async", "key", "kwargs", "mode",
                 "options", "session", "shown_inputs", "tampered", "tool_name")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 options: ToolExecutionOptions, tool_name: str, is_async: bool,
                 session: Session | None, mode: str) -> None:
        self.func, self.args, self.kwargs, self.options = func, args, kwargs, options
        self.tool_name, self.is_async = tool_name, is_async
        self.session, self.mode = session, mode  # the run's, as they were when the call began
        self.key = self.inputs = ""  # set for shared calls only
        self.shown_inputs = ""  # what receipts and messages show: inputs, minus redactions
        self.tampered = False  # counted once per call, however often the receipt was read
        self.duplicate = False  # mode="off": an earlier call had the same key


class _Result:
    __slots__ = ("encoded", "latency_ms", "receipt", "source", "takeover", "value")

    def __init__(self, value: Any, source: Source, receipt: Receipt | None = None,
                 encoded: tuple[str, str] | None = None, latency_ms: float = 0.0,
                 takeover: bool = False) -> None:
        self.value, self.source, self.receipt = value, source, receipt
        self.encoded = encoded  # lets each waiter decode its own copy
        self.latency_ms, self.takeover = latency_ms, takeover


class _Escaped(Exception):
    """Carries a tool's StopIteration through the generator, which would turn it into a
    RuntimeError (PEP 479)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


class _Wait:
    __slots__ = ("timeout",)

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout


_RUN = object()  # step: run the tool and send its value back
_Step = Any


def default_tool_name(func: Callable[..., Any], shared: bool) -> str:
    """``module.qualname``; for a shared lambda, closure, bound method or callable object,
    a ``TypeError`` asking for ``tool_name=``."""
    qualname = getattr(func, "__qualname__", None)
    name = f"{getattr(func, '__module__', None) or 'tool'}.{qualname or type(func).__qualname__}"
    if shared and (qualname is None or "<lambda>" in qualname or inspect.ismethod(func)
                   or getattr(func, "__closure__", None)):
        # The name does not tell apart what it captured: make_search("docs") and
        # make_search("tickets"), or Index("a").search and Index("b").search, would share.
        raise TypeError(f"{name} is a lambda, closure, bound method or callable object: pass "
                        f"tool_name= so that calls of different tools cannot share results")
    return check_text(name, "the tool name made of the function's module and name",
                      "pass tool_name= with plain text")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    if "asyncio" not in sys.modules:  # no loop can run without asyncio imported
        return None
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Backend:
    """What an engine opens on first use: its store, the key that signs for it, the
    heartbeat that renews its leases, and the flush of its statistics at exit."""

    __slots__ = ("flush_at_end", "heartbeat", "signer", "store")

    def __init__(self, store: ReceiptStore, signer: Signer, heartbeat: Heartbeat,
                 flush_at_end: weakref.finalize[Any, Any]) -> None:
        self.store, self.signer, self.heartbeat = store, signer, heartbeat
        self.flush_at_end = flush_at_end


class Singleflight:
    """Deduplicates tool calls across tasks, threads and processes sharing one store.

    ``db_path`` (or ``store``: a URL or a :class:`ReceiptStore`) says where receipts
    live; by default ``.singleflight/receipts.db`` under the current directory. The store
    is opened on first use. ``secret`` signs receipts (else ``$SINGLEFLIGHT_SECRET``, else
    a key file beside the store). ``run_id`` groups statistics of several processes (else
    ``$SINGLEFLIGHT_RUN_ID``, else a fresh id). ``mode`` is the mode of this engine's
    calls while no session is active (see :class:`~singleflight_agents.Session`);
    ``refresh_since`` is when a run in ``refresh`` mode started (default: now): older
    receipts are run again. ``record_command`` is what a replay miss tells the user to run.
    ``prices`` is the model price table the model wrappers count dollars with: a mapping, a
    JSON file (see :class:`~singleflight_agents.pricing.PriceTable`), else ``$SINGLEFLIGHT_PRICES``.

    While a session is active, this engine's calls run on the session's store, in its mode,
    under its run id. ``own_store=True`` opts out of the session's store (and statistics):
    calls then stay on this engine's store, still in the session's mode.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None = None,
        *,
        store: str | os.PathLike[str] | ReceiptStore | None = None,
        secret: str | bytes | None = None,
        run_id: str | None = None,
        refresh_since: float | None = None,
        prices: PriceSource | PriceTable = None,
        mode: str = "record",
        record_command: str = DEFAULT_RECORD_COMMAND,
        own_store: bool = False,
    ) -> None:
        if db_path is not None and store is not None:
            raise ValueError("pass either db_path or store, not both")
        where = store if store is not None else db_path
        if not isinstance(where, ReceiptStore) and is_sqlite_url(where):
            sqlite_path(where)  # a bad URL fails here, not at the first call
        if secret is not None and len(secret.strip() if isinstance(secret, str) else secret) < 16:
            raise StoreError("the signing secret from secret= is shorter than 16 bytes; use "
                             "a long random one")
        self._where, self._secret = where, secret
        self.mode = check_mode(mode, "Singleflight mode")
        self.record_command = record_command
        self._own_store = own_store
        self.run_id = check_text(run_id or os.environ.get(ENV_RUN_ID) or new_run_id(),
                                 "run id", f"pass run_id= or set ${ENV_RUN_ID} to plain text")
        self._instance = os.urandom(4).hex()
        self.refresh_since = time.time() if refresh_since is None else refresh_since
        self.prices = PriceTable.load(prices)
        self._stats = Stats()
        self._last_flush = 0.0
        self._warned: set[str] = set()
        self._verified: dict[str, Receipt] = {}  # receipt objects already checked, by key
        self._backend: _Backend | None = None
        self._open_lock = threading.Lock()

    @property
    def opened(self) -> bool:
        """Whether this engine has opened its store."""
        return self._backend is not None

    def open_for_replay(self) -> None:
        """Open the store now for a replay: a missing store or key raises
        :class:`StoreError`, and nothing is created."""
        if self._backend is None:
            self._open(replay=True)

    def _open(self, replay: bool = False) -> _Backend:
        if replay:  # checked before anything is opened: a replay creates no file
            check_replayable(self._where, self._secret, self.record_command)
        with self._open_lock:
            if self._backend is None:
                where = self._where
                store = where if isinstance(where, ReceiptStore) else open_store(where)
                key_path = key_path_for(store.path) if isinstance(store, SQLiteStore) else None
                try:
                    signer = Signer(load_key(self._secret, key_path, create=not replay))
                except BaseException:
                    if store is not where:
                        store.close()
                    raise
                # Pending counts are written at close, at exit, or when the engine is collected.
                flush = weakref.finalize(self, _flush_finally, store, self._stats, self.run_id,
                                         self._instance)
                self._backend = _Backend(store, signer, Heartbeat(store), flush)
            return self._backend

    @property
    def store(self) -> ReceiptStore:
        return (self._backend or self._open()).store

    @property
    def _signer(self) -> Signer:
        return (self._backend or self._open()).signer

    @property
    def _heartbeat(self) -> Heartbeat:
        return (self._backend or self._open()).heartbeat

    @property
    def db_path(self) -> str:
        return self.store.url

    @property
    def _owner(self) -> str:
        return _owner_id(self._instance)

    # -- public API -----------------------------------------------------------------

    def tool(self, func: F | None = None, /, **options: Any) -> Any:
        """Decorator: calls of the function go through the engine; sync stays sync.

        Takes the fields of :class:`ToolExecutionOptions` as keywords.
        """
        base = ToolExecutionOptions().replace(**options)

        def decorate(f: F) -> F:
            opts = base if base.tool_name else base.replace(tool_name=default_tool_name(f, base.shared))
            check_redact(f, opts.redact, opts.tool_name or "")  # a path naming nothing fails now
            wrapper: Any
            if binder(f).is_async:  # also an object with an async __call__, or a partial
                @functools.wraps(f)
                async def wrapper(*args: Any, **kwargs: Any) -> Any:
                    call = self._prepare(f, args, kwargs, opts)
                    return (await self._route(call)._execute(call)).value
            else:
                @functools.wraps(f)
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    call = self._prepare(f, args, kwargs, opts)
                    return self._route(call)._execute_sync(call).value
            wrapper.singleflight_options = opts
            return wrapper  # type: ignore[no-any-return]

        return decorate(func) if func is not None else decorate

    async def execute(
        self, func: Callable[..., Any], /, *args: Any,
        options: ToolExecutionOptions | None = None, **kwargs: Any,
    ) -> ExecutionOutcome:
        """Call ``func(*args, **kwargs)`` through the engine from async code."""
        call = self._prepare(func, args, kwargs, options)
        return await self._route(call)._execute(call)

    def execute_sync(
        self, func: Callable[..., Any], /, *args: Any,
        options: ToolExecutionOptions | None = None, **kwargs: Any,
    ) -> ExecutionOutcome:
        """Call ``func(*args, **kwargs)`` through the engine from sync code (any thread,
        also one running an event loop)."""
        call = self._prepare(func, args, kwargs, options)
        return self._route(call)._execute_sync(call)

    def summary(self, run_id: str | None = None) -> dict[str, Any]:
        """Statistics of the run (every process that shares ``run_id``), per tool: the
        session's run while one governs this engine."""
        engine = self._governing()
        engine.flush_stats()
        run = run_id or engine.run_id
        return summarize(engine.store.load_stats(run), db_path=engine.db_path, run_id=run)

    def verify_receipt(self, receipt: Receipt) -> bool:
        """Whether ``receipt`` carries a valid signature by the key of the store in use."""
        signer = self._governing()._signer
        return receipt.key_id == signer.key_id and signer.verify(receipt)

    def flush_stats(self) -> None:
        """Write this process's counters to the store now."""
        self._last_flush = time.monotonic()
        if self._backend is not None or self._stats.dirty:
            _flush_stats(self.store, self._stats, self.run_id, self._instance)

    def close(self) -> None:
        """Write pending statistics and close this thread's store connection."""
        backend = self._backend
        if backend is None:
            return
        try:
            backend.flush_at_end.detach()
            _flush_stats(backend.store, self._stats, self.run_id, self._instance)
        except StoreError as exc:
            warnings.warn(f"singleflight: statistics not written: {exc}", RuntimeWarning,
                          stacklevel=2)
        finally:
            backend.store.close()

    def __enter__(self) -> Singleflight:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the two entries ------------------------------------------------------------

    def current_mode(self) -> str:
        """The mode a call made now runs in: the active session's, else this engine's."""
        session = active_session()
        return self.mode if session is None else session.mode_now()

    def _governing(self) -> Singleflight:
        """The engine this one's calls run on now: the active session's, unless opted out."""
        session = active_session()
        return self if session is None or self._own_store else session.engine

    def _route(self, call: _Call) -> Singleflight:
        return self if call.session is None or self._own_store else call.session.engine

    def _prepare(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 options: ToolExecutionOptions | None) -> _Call:
        if options is None:
            options = getattr(func, "singleflight_options", None) or ToolExecutionOptions()
        func = getattr(func, "__wrapped__", func) if hasattr(func, "singleflight_options") else func
        if not callable(func):
            raise TypeError(f"expected a callable tool, got {type(func).__name__}")
        bind = binder(func)
        session = active_session()
        call = _Call(func, args, kwargs, options,
                     options.tool_name or default_tool_name(func, options.shared), bind.is_async,
                     session, self.mode if session is None else session.mode_now())
        if options.shared:
            ident = options.key(*args, **kwargs) if options.key else bind.bind(args, kwargs)
            call.inputs = call.shown_inputs = encode_inputs(call.tool_name, ident)
            if options.redact is not None:
                call.shown_inputs = shown_inputs(call.tool_name, func, options.redact, ident,
                                                 args, kwargs, keyed=options.key is not None)
            call.key = fingerprint_of(call.tool_name, call.inputs, namespace=options.namespace,
                                      scope=options.scope, version=options.version)
        return call

    async def _execute(self, call: _Call) -> ExecutionOutcome:
        started = time.perf_counter()
        try:
            start = self._start(call)
            if isinstance(start, Source):
                return self._finish(call, await self._run_unshared_async(call, start), started)
            if start is not None:
                return self._finish(call, start, started)
            while True:
                flight, owner = FLIGHTS.join((self.store.identity, call.key))
                if owner and call.is_async:
                    return self._finish(call, await self._own_async(call, flight), started)
                if owner:  # a sync tool runs in a thread of its own, which owns the flight
                    result = await run_in_thread(self._own_sync, call, flight,
                                                 name="singleflight-owner")
                    return self._finish(call, result, started)
                if (self.store.identity, call.key) in RUNNING.get():
                    self._note_fallback(call, "it was called again, with the same arguments, by "
                                              "its own run")
                    result = await self._run_unshared_async(call, Source.EXECUTED_FALLBACK)
                    return self._finish(call, result, started)
                try:
                    result = await wait_future(flight.future, call.options.wait_timeout_seconds)
                except WaitTimeout:
                    self._note_fallback(call, "waiting for it timed out")
                    result = await self._run_unshared_async(call, Source.EXECUTED_FALLBACK)
                    return self._finish(call, result, started)
                if result is not ABANDONED:
                    return self._finish(call, self._as_waiter(result), started)
        except BaseException:
            self._stats.add(call.tool_name, calls=1, raised=1, tampered=int(call.tampered))
            raise

    def _execute_sync(self, call: _Call) -> ExecutionOutcome:
        started = time.perf_counter()
        try:
            start = self._start(call)
            if isinstance(start, Source):
                return self._finish(call, self._run_unshared(call, start), started)
            if start is not None:
                return self._finish(call, start, started)
            while True:
                flight, owner = FLIGHTS.join((self.store.identity, call.key))
                if owner:
                    return self._finish(call, self._own_sync(call, flight), started)
                reason = None
                if (self.store.identity, call.key) in RUNNING.get():
                    reason = "it was called again, with the same arguments, by its own run"
                elif flight.loop is not None and flight.loop is _running_loop():
                    reason = "its owner runs on the event loop this sync call blocks"
                else:
                    try:
                        result = wait_sync(flight.future, call.options.wait_timeout_seconds)
                    except WaitTimeout:
                        reason = "waiting for it timed out"
                if reason is not None:
                    self._note_fallback(call, reason)
                    result = self._run_unshared(call, Source.EXECUTED_FALLBACK)
                    return self._finish(call, result, started)
                if result is not ABANDONED:
                    return self._finish(call, self._as_waiter(result), started)
        except BaseException:
            self._stats.add(call.tool_name, calls=1, raised=1, tampered=int(call.tampered))
            raise

    # -- owning a flight ------------------------------------------------------------

    def _own_sync(self, call: _Call, flight: Flight) -> _Result:
        try:
            result = self._drive_sync(call, self._resolve(call))
        except BaseException as exc:
            self._land(call, flight, exc)
            raise
        self._land(call, flight, result)
        return result

    async def _own_async(self, call: _Call, flight: Flight) -> _Result:
        import asyncio

        flight.loop = asyncio.get_running_loop()
        try:
            result = await self._drive_async(call, self._resolve(call))
        except BaseException as exc:
            self._land(call, flight, exc)
            raise
        self._land(call, flight, result)
        return result

    def _land(self, call: _Call, flight: Flight, result: _Result | BaseException) -> None:
        # The tool's own errors reach every waiter; a cancelled or interrupted owner
        # (CancelledError, KeyboardInterrupt, ...) hands the flight to a waiter instead.
        abandoned = isinstance(result, BaseException) and not isinstance(result, Exception)
        FLIGHTS.land((self.store.identity, call.key), flight, ABANDONED if abandoned else result)

    def _drive_sync(self, call: _Call, steps: Generator[_Step, Any, _Result]) -> _Result:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as stop:
                result: _Result = stop.value
                return result
            except _Escaped as escaped:
                raise escaped.original from None
            reply, error = None, None
            try:
                if step is _RUN:
                    with running((self.store.identity, call.key)):
                        reply = self._call_tool(call)
                else:
                    self.store.wait(call.key, step.timeout)
            except BaseException as exc:
                error = _Escaped(exc) if isinstance(exc, StopIteration) else exc

    async def _drive_async(self, call: _Call, steps: Generator[_Step, Any, _Result]) -> _Result:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as stop:
                result: _Result = stop.value
                return result
            except _Escaped as escaped:
                raise escaped.original from None
            reply, error = None, None
            try:
                if step is _RUN:
                    with running((self.store.identity, call.key)):
                        reply = await call.func(*call.args, **call.kwargs)
                else:
                    await run_in_thread(self.store.wait, call.key, step.timeout)
            except BaseException as exc:
                error = _Escaped(exc) if isinstance(exc, StopIteration) else exc

    # -- the decisions, shared by both entries ----------------------------------------

    def _resolve(self, call: _Call) -> Generator[_Step, Any, _Result]:
        try:
            got = yield from self._get_lease(call)
        except StoreError as exc:
            got = f"the store failed: {exc}"
        if isinstance(got, Lease):
            return (yield from self._run_holding(call, got))
        if isinstance(got, _Result):
            return got
        self._note_fallback(call, got)
        value = yield _RUN
        return _Result(value, Source.EXECUTED_FALLBACK)

    def _get_lease(self, call: _Call) -> Generator[_Step, Any, Lease | _Result | str]:
        """The lease, a result someone else produced meanwhile, or why neither came."""
        options = call.options
        deadline = time.monotonic() + options.wait_timeout_seconds
        # No look before the first acquire: the fast path has just looked, and a holder looks
        # again once it has the lease (_run_holding). After a wait, the result is theirs.
        while True:
            attempt = self.store.acquire(call.key, self._owner, options.lease_seconds)
            if isinstance(attempt, Lease):
                return attempt
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "waiting for another process timed out"
            yield _Wait(remaining)
            hit = self._lookup(call)
            if hit is not None:
                hit.source = Source.SHARED_WAIT
                return hit
            if options.share_failures:
                failure = self.store.last_failure(call.key)
                if failure is not None and failure.token >= attempt.since_token:
                    raise SharedExecutionError(call.tool_name, failure.error_type, failure.message)

    def _run_holding(self, call: _Call, lease: Lease) -> Generator[_Step, Any, _Result]:
        with self._heartbeat.hold(lease):
            try:
                hit = self._lookup(call)  # a holder may have finished since our last look
            except StoreError:
                hit = None  # the store just failed: run the tool; storing it will warn
            if hit is not None:
                with contextlib.suppress(StoreError):
                    self.store.release(lease)
                return hit
            try:
                started = time.perf_counter()
                value = yield _RUN
            except BaseException as exc:
                failure = None
                if isinstance(exc, Exception):  # not cancelled or interrupted: the tool failed
                    self._stats.add(call.tool_name, failures=1)
                    error = exc.original if isinstance(exc, _Escaped) else exc
                    # A message may hold a secret ("401 for ?key=sk-..."): it is stored only
                    # when the tool shares its failures, else the type alone.
                    message = _describe(error, 2000) if call.options.share_failures else ""
                    failure = (type(error).__qualname__, message)
                with contextlib.suppress(Exception):  # the tool's error matters more
                    self.store.release(lease, failure)
                raise
        latency_ms = (time.perf_counter() - started) * 1000
        # Counted here, not per caller: the run happened even if its caller was cancelled.
        self._stats.add(call.tool_name, executed=1, takeovers=int(lease.takeover))
        result = _Result(value, Source.EXECUTED, latency_ms=latency_ms, takeover=lease.takeover)
        self._persist(call, result, lease)
        return result

    def _persist(self, call: _Call, result: _Result, lease: Lease) -> None:
        """Store the receipt; on any failure, release the lease (waiters elsewhere must not
        wait it out) and warn: the result still reaches every caller of this flight."""
        try:
            self._store_receipt(call, result, lease)
        except Exception as exc:
            result.encoded = None  # waiters share the value itself
            with contextlib.suppress(Exception):
                self.store.release(lease)
            self._stats.add(call.tool_name, not_persisted=1)
            if isinstance(exc, codec.UnencodableError):
                why = (f"result of type {exc.type_name} cannot be stored as JSON (return "
                       f"JSON-able data" + (")" if call.options.allow_pickle else
                                            ", or pass allow_pickle=True)"))
            elif isinstance(exc, StoreError):
                why = f"the store failed: {exc}"
            else:  # e.g. an int of 5,000 digits, a list nested 10,000 deep or holding itself
                why = f"result cannot be stored ({type(exc).__name__}: {_describe(exc)})"
            self._warn(call.tool_name, f"{call.tool_name}: {why}; the result reached this "
                       f"call's waiters, but was not persisted")

    def _store_receipt(self, call: _Call, result: _Result, lease: Lease) -> None:
        options = call.options
        result.encoded = codec.encode(result.value, options.allow_pickle)
        if result.encoded[0] != codec.JSON:
            # Every waiter and every later caller decodes it: a pickle that does not load
            # back (a __reduce__ that raises) is shared as the value itself, never stored.
            codec.decode(*result.encoded, allow_pickle=True)
        now = time.time()
        receipt = self._signer.sign(Receipt(
            fingerprint=call.key, tool_name=call.tool_name, namespace=options.namespace,
            scope=options.scope, version=options.version,
            inputs=call.shown_inputs if options.store_inputs else None,
            inputs_sha256=hashlib.sha256(call.inputs.encode()).hexdigest(),
            codec=result.encoded[0], output=result.encoded[1], created_at=now,
            expires_at=now + options.ttl_seconds, latency_ms=round(result.latency_ms, 3),
            cost_usd=options.estimated_cost_usd, executor=self._owner, token=lease.token,
            key_id=self._signer.key_id,
        ))
        if self.store.put(receipt, lease):
            result.receipt = receipt
        else:
            self._stats.add(call.tool_name, fenced_out=1)
            self._warn(call.tool_name, f"{call.tool_name}: lease was taken over while the tool "
                       f"ran; the newer holder's receipt was kept")

    def _lookup(self, call: _Call) -> _Result | None:
        receipt = self.store.get(call.key)
        if receipt is None or not self._trusted(call, receipt):
            return None
        mode = call.mode
        if mode != "replay" and receipt.expires_at <= time.time():
            return None
        if mode == "refresh" and receipt.created_at < (
                self.refresh_since if call.session is None else call.session.started):
            return None
        try:
            value = codec.decode(receipt.codec, receipt.output, call.options.allow_pickle)
        except Exception as exc:  # e.g. a pickled class that no longer imports: run again
            self._warn(f"decode:{call.tool_name}", f"{call.tool_name}: a stored result could not "
                       f"be decoded ({type(exc).__name__}: {_describe(exc)}); not served")
            return None
        return _Result(value, Source.CACHE_HIT, receipt, (receipt.codec, receipt.output),
                       receipt.latency_ms)

    def _trusted(self, call: _Call, receipt: Receipt) -> bool:
        # Each receipt is checked once: SQLite hands back the very object it read until the
        # file changes; Redis a new one, equal in every field to the one checked before.
        known = self._verified.get(call.key)
        if known is receipt or known == receipt:
            return True
        try:
            valid = receipt.fingerprint == call.key and self.verify_receipt(receipt)
        except (TypeError, ValueError):  # fields of the wrong type: edited in the store
            valid = False
        if not valid:
            call.tampered = True
            then = "not served" if call.mode == "replay" else "re-executing"
            self._warn(f"tampered:{call.tool_name}", f"{call.tool_name}: a stored receipt failed "
                       f"its signature check (tampered, or signed with another key); {then}")
            return False
        if len(self._verified) >= 4096:
            self._verified.clear()
        self._verified[call.key] = receipt
        return True

    def _start(self, call: _Call) -> _Result | Source | None:
        """Before any flight: a result to return, the source to run the tool under without
        sharing, or ``None`` to join the flight."""
        if not call.options.shared:
            if call.mode == "replay" and not call.options.side_effecting:
                raise self._miss(call)  # undeclared: replay neither serves nor runs it
            return Source.EXECUTED_UNSHARED
        if self._backend is None:
            # A store or key that cannot be opened is a setting to fix, not a passing failure
            # to run through: it raises, as it did when stores were opened at construction.
            self._open(replay=call.mode == "replay")
        if self._off(call):
            return Source.EXECUTED_UNSHARED
        try:
            return self._fast_lookup(call)
        except StoreError as exc:  # no use asking the store again: run it now
            if call.mode == "replay":
                raise  # replay never runs a shared tool
            self._note_fallback(call, f"the store failed: {exc}")
            return Source.EXECUTED_FALLBACK

    def _fast_lookup(self, call: _Call) -> _Result | None:
        """A receipt without joining a flight; in replay mode, a receipt or an error."""
        if call.mode == "replay":
            hit = self._lookup(call)
            if hit is None:
                raise self._miss(call)
            return hit
        if FLIGHTS.peek((self.store.identity, call.key)) is not None:
            return None
        return self._lookup(call)

    def _miss(self, call: _Call) -> ReplayMissError:
        self._stats.add(call.tool_name, replay_misses=1)
        session = call.session
        error = ReplayMissError(
            call.tool_name, call.shown_inputs,
            self.record_command if session is None else session.record_command_now(),
            undeclared=not call.options.shared, tampered=call.tampered)
        if session is not None:
            session.missed(error)  # fails its test even if the agent swallows it
        return error

    def _off(self, call: _Call) -> bool:
        """In mode="off", count the call if an earlier one had the same key."""
        if call.mode != "off":
            return False
        try:  # kept in the store, so that every process of the run counts alike
            repeated = not self.store.first_call(self.run_id, call.key)
        except StoreError:
            repeated = False  # a count is not worth failing the call for
        if repeated:
            call.duplicate = True
            self._stats.add(call.tool_name, duplicates=1,
                            duplicate_dollars=call.options.estimated_cost_usd)
        return True

    # -- running tools --------------------------------------------------------------

    def _call_tool(self, call: _Call) -> Any:
        coroutine = call.func(*call.args, **call.kwargs)
        # An async tool, or a sync callable that hands one back (a wrapper, a lambda): its
        # result is what the coroutine returns, never the coroutine itself.
        if not inspect.iscoroutine(coroutine):
            return coroutine
        import asyncio

        if _running_loop() is None:
            return asyncio.run(coroutine)
        # This thread runs a loop we must not re-enter: give the coroutine its own.
        # The loop's thread gets this context: a flight running here is known there too.
        context = contextvars.copy_context()
        return start_thread(context.run, asyncio.run, coroutine, name="singleflight-loop").result()

    def _run_unshared(self, call: _Call, source: Source) -> _Result:
        started = time.perf_counter()
        value = self._call_tool(call)
        return _Result(value, source, latency_ms=(time.perf_counter() - started) * 1000)

    async def _run_unshared_async(self, call: _Call, source: Source) -> _Result:
        started = time.perf_counter()
        if call.is_async:
            value = await call.func(*call.args, **call.kwargs)
        else:
            value = await run_in_thread(self._call_tool, call)
        return _Result(value, source, latency_ms=(time.perf_counter() - started) * 1000)

    def _note_fallback(self, call: _Call, reason: str) -> None:
        self._warn(call.tool_name, f"{call.tool_name}: executing without sharing because {reason}")
        self._stats.add(call.tool_name, fallbacks=1)

    # -- bookkeeping ----------------------------------------------------------------

    def _as_waiter(self, result: _Result) -> _Result:
        hit = result.source is Source.CACHE_HIT
        source = Source.CACHE_HIT if hit else Source.SHARED_WAIT
        value = result.value
        if result.encoded is not None:  # every waiter gets its own copy, like a cache hit
            value = codec.decode(*result.encoded, allow_pickle=True)
        return _Result(value, source, result.receipt, result.encoded, result.latency_ms)

    def _finish(self, call: _Call, result: _Result, started: float) -> ExecutionOutcome:
        source = result.source
        counters: dict[str, float] = {"calls": 1, "tampered": int(call.tampered)}
        if source in (Source.CACHE_HIT, Source.SHARED_WAIT):
            counters["cache_hits" if source is Source.CACHE_HIT else "shared_waits"] = 1
            counters["dollars_saved"] = call.options.estimated_cost_usd
            counters["latency_saved_ms"] = result.latency_ms
        elif source is Source.EXECUTED_UNSHARED:
            counters["unshared"] = 1
        if call.options.meter is not None:
            self._count_usage(call, call.options.meter, result, counters)
        self._stats.add(call.tool_name, **counters)
        if time.monotonic() - self._last_flush > _FLUSH_INTERVAL:  # batched: at most 1 write/s
            try:
                self.flush_stats()
            except Exception as exc:  # counting must never fail a call whose tool has run
                self._warn("flush", f"singleflight: statistics not written: {_describe(exc)}")
        outcome = ExecutionOutcome(
            value=result.value, source=source, tool_name=call.tool_name, fingerprint=call.key,
            receipt=result.receipt, elapsed_ms=(time.perf_counter() - started) * 1000,
            takeover=result.takeover,
        )
        if call.session is not None:
            call.session.observe(outcome)
        return outcome

    def _count_usage(self, call: _Call, meter: Callable[[Any], tuple[int, int, float | None]],
                     result: _Result, counters: dict[str, float]) -> None:
        """Tokens and dollars of the result (``options.meter``): spent if it ran, else saved."""
        try:
            tokens_in, tokens_out, dollars = _usage(meter(result.value))
        except Exception as exc:  # a report detail must never fail the call
            self._warn(f"meter:{call.tool_name}", f"{call.tool_name}: its meter failed "
                       f"({type(exc).__name__}: {_describe(exc)}); its tokens are not counted")
            return
        saved = result.source in (Source.CACHE_HIT, Source.SHARED_WAIT)
        suffix = "_saved" if saved else ""
        counters["tokens_in" + suffix] = tokens_in
        counters["tokens_out" + suffix] = tokens_out
        if dollars is None:
            counters["unpriced"] = 1
        elif saved:
            counters["dollars_saved"] = counters.get("dollars_saved", 0.0) + dollars
        else:
            counters["dollars_spent"] = dollars
            if call.duplicate:
                counters["duplicate_dollars"] = dollars

    def _warn(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _usage(usage: object) -> tuple[int, int, float | None]:
    """What a meter returned, checked: it is added into the run's statistics for good."""
    if not isinstance(usage, tuple) or len(usage) != 3:
        raise ValueError(f"a meter returns (tokens_in, tokens_out, dollars), got {usage!r:.60}")
    tokens_in: Any = usage[0]
    tokens_out: Any = usage[1]
    dollars: Any = usage[2]
    for tokens in (tokens_in, tokens_out):
        if type(tokens) is not int or not 0 <= tokens < 10 ** 15:
            raise ValueError(f"token counts must be ints from 0, got {tokens!r:.40}")
    if dollars is not None and (type(dollars) not in (int, float) or not math.isfinite(dollars)
                                or not 0 <= dollars < 1e9):
        raise ValueError(f"dollars must be None or a number from 0, got {dollars!r:.40}")
    return tokens_in, tokens_out, dollars


def _describe(exc: BaseException, limit: int = 300) -> str:
    try:
        text = str(exc)[:limit]
    except Exception:  # an exception whose __str__ fails is still reported
        return f"<{type(exc).__name__} whose str() failed>"
    return text.encode("utf-8", "backslashreplace").decode()


def _owner_id(instance: str) -> str:
    return f"{os.uname().nodename}:{os.getpid()}:{instance}"


def _flush_finally(store: ReceiptStore, stats: Stats, run_id: str, instance: str) -> None:
    """At exit or collection: one line if the counts cannot be written (the store is gone,
    the disk full), never a traceback."""
    try:
        _flush_stats(store, stats, run_id, instance)
    except Exception as exc:
        with contextlib.suppress(Exception):  # stderr itself may be gone at exit
            print(f"singleflight: statistics not written at exit: {_describe(exc)}",
                  file=sys.stderr)


def _flush_stats(store: ReceiptStore, stats: Stats, run_id: str, instance: str) -> None:
    counters = stats.snapshot()
    if counters:
        try:
            store.save_stats(run_id, _owner_id(instance), counters)
        except BaseException:
            stats.dirty = True  # written next time
            raise
