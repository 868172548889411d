"""The engine: one execution per fingerprint among every caller sharing a store.

A call goes: fingerprint -> in-process flight table -> store receipt -> store lease ->
run the tool (see docs/how-it-works.md). :class:`Singleflight` prepares the call; every
decision is made in one generator (:mod:`._flow`), carried out by one of two thin drivers
(:mod:`._drive`): one blocks its thread, one awaits on its loop.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from ._accounting import flush_stats, owner_id
from ._backend import Backend, open_backend
from ._call import Call, call_of_function, call_of_identity, default_tool_name
from ._drive import drive_async, drive_sync, running_loop
from ._flow import begin, first_look
from .fingerprint import (
    binder,
    check_redact,
)
from .heartbeat import Heartbeat
from .models import ExecutionOutcome, Receipt, StoreError, ToolExecutionOptions, check_mode, check_text
from .pricing import PriceSource, PriceTable
from .sessions import DEFAULT_RECORD_COMMAND, ENV_RUN_ID, active_session, new_run_id
from .signing import Signer, secret_key
from .stats import Stats, summarize
from .store import ReceiptStore, is_sqlite_url, sqlite_path

__all__ = ["Singleflight", "default_tool_name"]

F = TypeVar("F", bound=Callable[..., Any])


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
        if secret is not None:
            secret_key(secret)  # a short secret fails here, not at the first call
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
        # Receipt objects already checked, by key, oldest first
        self._verified: OrderedDict[str, Receipt] = OrderedDict()
        self._backend: Backend | None = None
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

    def _open(self, replay: bool = False) -> Backend:
        with self._open_lock:
            if self._backend is None:
                self._backend = open_backend(
                    self, self._where, self._secret, replay=replay,
                    record_command=self.record_command, stats=self._stats, run_id=self.run_id,
                    instance=self._instance)
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
        return owner_id(self._instance)

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
                    return (await self._run(call_of_function(f, args, kwargs, opts, self.mode))).value
            else:
                @functools.wraps(f)
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    return self._run_sync(call_of_function(f, args, kwargs, opts, self.mode)).value
            wrapper.singleflight_options = opts
            return wrapper  # type: ignore[no-any-return]

        return decorate(func) if func is not None else decorate

    async def execute(
        self, func: Callable[..., Any], /, *args: Any,
        options: ToolExecutionOptions | None = None, **kwargs: Any,
    ) -> ExecutionOutcome:
        """Call ``func(*args, **kwargs)`` through the engine from async code."""
        return await self._run(self._prepare(func, args, kwargs, options))

    def execute_sync(
        self, func: Callable[..., Any], /, *args: Any,
        options: ToolExecutionOptions | None = None, **kwargs: Any,
    ) -> ExecutionOutcome:
        """Call ``func(*args, **kwargs)`` through the engine from sync code (any thread,
        also one running an event loop)."""
        return self._run_sync(self._prepare(func, args, kwargs, options))

    async def do(self, tool_name: str, identity: Any, fn: Callable[[], Any], /, *,
                 options: ToolExecutionOptions | None = None) -> ExecutionOutcome:
        """Run ``fn()`` once for all callers of ``tool_name`` with equal ``identity`` (any
        JSON-able value: the call's arguments as they should be keyed), from async code.
        ``fn`` runs on the event loop; what it returns is awaited if it is awaitable.
        ``options``: its ``tool_name`` and ``key`` are not used; ``redact`` names dotted
        paths into ``identity``, or is a function of it."""
        return await self._run(self._prepare_do(tool_name, identity, fn, options, True))

    def do_sync(self, tool_name: str, identity: Any, fn: Callable[[], Any], /, *,
                options: ToolExecutionOptions | None = None) -> ExecutionOutcome:
        """:meth:`do` from sync code: ``fn()`` runs in the calling thread (a coroutine it
        returns runs to its end)."""
        return self._run_sync(self._prepare_do(tool_name, identity, fn, options, False))

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
            flush_stats(self.store, self._stats, self.run_id, self._instance)

    def close(self) -> None:
        """Write pending statistics and close the store's connections (every thread's)."""
        backend = self._backend
        if backend is None:
            return
        try:
            backend.flush_at_end.detach()
            flush_stats(backend.store, self._stats, self.run_id, self._instance)
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

    def current_prices(self) -> PriceTable:
        """The price table a call made now is counted with: the active session's, else this
        engine's."""
        return self._governing().prices

    def _governing(self) -> Singleflight:
        """The engine this one's calls run on now: the active session's, unless opted out."""
        session = active_session()
        return self if session is None or self._own_store else session.engine

    def _prepare(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 options: ToolExecutionOptions | None) -> Call:
        return call_of_function(func, args, kwargs, options, self.mode)

    def _prepare_do(self, tool_name: str, identity: Any, fn: Callable[[], Any],
                    options: ToolExecutionOptions | None, is_async: bool) -> Call:
        return call_of_identity(tool_name, identity, fn, options, is_async, self.mode)

    def _engine_for(self, call: Call) -> Singleflight:
        """The engine the call runs on: the session's, unless this one opted out."""
        return self if call.session is None or self._own_store else call.session.engine

    async def _run(self, call: Call) -> ExecutionOutcome:
        engine = self._engine_for(call)
        backend = engine._backend
        if backend is not None and (not backend.store.runs_on_loop or call.mode == "off"):
            # The first look may wait on a server (or write, in mode "off"). Not the first
            # call's, which opens the store: as before, callers join flights in call order.
            got = await drive_async(call, first_look(engine, call))
        else:
            got = begin(engine, call)
        self._looked()
        if isinstance(got, ExecutionOutcome):
            return got
        call.loop = running_loop()
        return await drive_async(call, got)

    def _looked(self) -> None:
        """After an async call's first look; from there on it reaches its flight without
        yielding to the loop (a test's hook)."""

    def _run_sync(self, call: Call) -> ExecutionOutcome:
        got = begin(self._engine_for(call), call)
        return got if isinstance(got, ExecutionOutcome) else drive_sync(call, got)

    def _warn(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
