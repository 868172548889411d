"""The session: what belongs to a run, not to a tool (store, mode, run id, prices).

While a session is active, every engine in the process runs its shared calls through the
session's engine (one per store per process), in the session's mode, counted under the
session's run id, whoever created the engine and whenever. It is process-wide on purpose:
calls from threads and tasks a test started belong to that test too. Sessions nest (the
innermost wins), so a pytest run inside a pytest run governs its own calls.

A *scope* is the unit calls are attributed to while it is open (the plugin opens one per
test): its outcomes, its replay misses, and a mode it asks for (``record`` or ``refresh``
only; a session in ``replay`` or ``off`` always wins).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .models import ExecutionOutcome, ReplayMissError, StoreError, check_mode

if TYPE_CHECKING:
    from .engine import Singleflight
    from .pricing import PriceSource, PriceTable
    from .store import ReceiptStore

ENV_RUN_ID = "SINGLEFLIGHT_RUN_ID"
DEFAULT_RECORD_COMMAND = "pytest --singleflight-mode=record"
_STACK: list[Session] = []  # active sessions, innermost last
_STACK_LOCK = threading.Lock()


def active_session() -> Session | None:
    """The session that governs calls in this process now, if any."""
    stack = _STACK
    return stack[-1] if stack else None


def new_run_id(prefix: str = "") -> str:
    return prefix + time.strftime("%Y%m%dT%H%M%S-") + os.urandom(3).hex()


class Scope:
    """Calls attributed to one unit of work while it is open (e.g. one test)."""

    def __init__(self, name: str, mode: str | None = None, record_command: str | None = None,
                 on_outcome: Callable[[ExecutionOutcome], None] | None = None) -> None:
        if mode is not None:
            check_mode(mode, f"{name}: mode")
        self.name, self.mode, self.record_command = name, mode, record_command
        self.on_outcome = on_outcome
        self.outcomes: list[ExecutionOutcome] = []
        self.misses: list[ReplayMissError] = []


class Session:
    """A run's settings, for every engine in the process while active.

    ``store`` is a path, a URL or a :class:`ReceiptStore` (default
    ``.singleflight/receipts.db``); ``mode`` is ``record`` (serve receipts, run and record
    misses), ``replay`` (never run a shared call: a miss raises :class:`ReplayMissError`),
    ``refresh`` (run each distinct call once in this session, overwriting older receipts)
    or ``off`` (run every call, count the duplicates). ``run_id`` groups the statistics of
    every process of the run (else ``$SINGLEFLIGHT_RUN_ID``, else a fresh id). ``secret``
    and ``prices`` are as for :class:`Singleflight`. ``record_command`` is what a replay
    miss tells the user to run. Use it as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(self, store: str | os.PathLike[str] | ReceiptStore | None = None, *,
                 mode: str = "record", run_id: str | None = None,
                 secret: str | bytes | None = None, prices: PriceSource | PriceTable = None,
                 record_command: str | None = None, started: float | None = None) -> None:
        from .pricing import PriceTable

        self.mode = check_mode(mode, "session mode")
        self.store = store
        self.run_id = run_id or os.environ.get(ENV_RUN_ID) or new_run_id()
        self.started = time.time() if started is None else started
        self.secret = secret
        self.prices = PriceTable.load(prices)
        self.record_command = record_command or DEFAULT_RECORD_COMMAND
        self._engine: Singleflight | None = None
        self._lock = threading.Lock()
        self.used = False  # whether any call went through this session's engine
        self._scopes: list[Scope] = []

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> Session:
        """Govern every engine in this process from now on. In replay, a store or key that
        does not exist stops here with a :class:`StoreError`, and no file is created."""
        if self.mode == "replay":
            self.check_replayable()
        with _STACK_LOCK:
            _STACK.append(self)
        return self

    def stop(self) -> None:
        """Stop governing, write pending statistics and close the session's engine."""
        with _STACK_LOCK:
            if self in _STACK:
                _STACK.remove(self)
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def engine(self) -> Singleflight:
        """The engine every governed call runs on: one per session, opened on first use."""
        engine = self._engine
        if engine is None:
            with self._lock:  # the first calls may come from several threads at once
                if self._engine is None:
                    from .engine import Singleflight

                    self._engine = Singleflight(
                        store=self.store, secret=self.secret, run_id=self.run_id,
                        refresh_since=self.started, prices=self.prices, mode=self.mode,
                        record_command=self.record_command, own_store=True)
                    self.used = True
                engine = self._engine
        return engine

    def check_replayable(self) -> None:
        """A :class:`StoreError` naming the fix if replay cannot work: no store file, or no
        key to check its receipts with. Creates nothing."""
        from .signing import ENV_SECRET, key_path_for
        from .store import ReceiptStore, is_sqlite_url, sqlite_path

        if isinstance(self.store, ReceiptStore) or not is_sqlite_url(self.store):
            if self.secret is None and not os.environ.get(ENV_SECRET):
                if isinstance(self.store, ReceiptStore) and hasattr(self.store, "path"):
                    return  # an open SQLite store: its key file is checked on first use
                raise StoreError(f"replay needs the key that signed the receipts: set "
                                 f"{ENV_SECRET} (a server store has no key file)")
            return
        path: Path = sqlite_path(self.store)
        if not path.is_file():
            raise StoreError(f"replay: receipt store {path} does not exist; record it first "
                             f"({self.record_command}) or copy it here with its key file "
                             f"{key_path_for(path).name}")
        if self.secret is None and not os.environ.get(ENV_SECRET) \
                and not key_path_for(path).is_file():
            raise StoreError(f"replay: the key of {path} is missing ({key_path_for(path)}); "
                             f"copy the key file beside the store, or set {ENV_SECRET} to "
                             f"its content")

    # -- attribution --------------------------------------------------------------------

    @contextlib.contextmanager
    def scope(self, name: str, *, mode: str | None = None, record_command: str | None = None,
              on_outcome: Callable[[ExecutionOutcome], None] | None = None) -> Iterator[Scope]:
        """Attribute every call in the process to ``name`` until the block ends."""
        opened = Scope(name, mode, record_command, on_outcome)
        self._scopes.append(opened)
        try:
            yield opened
        finally:
            self._scopes.remove(opened)

    @property
    def current(self) -> Scope | None:
        scopes = self._scopes
        return scopes[-1] if scopes else None

    def mode_now(self) -> str:
        """The mode of a call made now: the session's, unless it records or refreshes and
        the open scope asks for another."""
        scope = self.current
        if scope is None or scope.mode is None or self.mode in ("replay", "off"):
            return self.mode
        return scope.mode

    def record_command_now(self) -> str:
        scope = self.current
        return scope.record_command if scope is not None and scope.record_command \
            else self.record_command

    def observe(self, outcome: ExecutionOutcome) -> None:
        scope = self.current
        if scope is not None:
            scope.outcomes.append(outcome)
            if scope.on_outcome is not None:
                scope.on_outcome(outcome)

    def missed(self, error: ReplayMissError) -> None:
        scope = self.current
        if scope is not None:
            scope.misses.append(error)


def session(store: str | os.PathLike[str] | ReceiptStore | None = None, *, mode: str = "record",
            run_id: str | None = None, secret: str | bytes | None = None,
            prices: PriceSource | PriceTable = None, record_command: str | None = None) -> Session:
    """A :class:`Session` to use as ``with session("receipts.db", mode="replay"): ...``."""
    return Session(store, mode=mode, run_id=run_id, secret=secret, prices=prices,
                   record_command=record_command)
