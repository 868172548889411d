"""The session: what belongs to a run, not to a tool (store, mode, run id, prices).

While a session is active, every engine in the process runs its shared calls through the
session's engine (one per store per process), in the session's mode, counted under the
session's run id, whoever created the engine and whenever. It is process-wide on purpose:
calls from threads and tasks a test started belong to that test too. Sessions nest (the
innermost governs, so a pytest run inside a pytest run has its own store and report), but an
outer session in ``replay`` or ``off`` holds every inner one to that mode. A started session
is exported to the processes started after it (``$SINGLEFLIGHT_SESSION``): a child that
imports the library is governed by the same store, mode and run id.

A *scope* is the unit calls are attributed to while it is open (the plugin opens one per
test): its outcomes, its replay misses, and a mode it asks for (``record`` or ``refresh``
only; a session in ``replay`` or ``off`` always wins).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._http_keys import Hosts
from .models import (
    ExecutionOutcome,
    ReplayMissError,
    SingleflightError,
    StoreError,
    check_mode,
    check_text,
)

if TYPE_CHECKING:
    from .engine import Singleflight
    from .pricing import PriceSource, PriceTable
    from .store import ReceiptStore

ENV_RUN_ID = "SINGLEFLIGHT_RUN_ID"
ENV_SESSION = "SINGLEFLIGHT_SESSION"  # an active session, for the processes it starts
DEFAULT_RECORD_COMMAND = "pytest --singleflight-mode=record"
_STACK: list[Session] = []  # active sessions, innermost last
_STACK_LOCK = threading.Lock()
_INHERITED: dict[str, Session] = {}  # the session this process took from its environment
# Read once: a parent exports its session before it starts a process; sessions this process
# starts itself are on the stack. (Looking the variable up per call costs a hit ~5%.)
_FROM_PARENT = os.environ.get(ENV_SESSION)
_ENV_BEFORE: str | None = None  # the variable before this process's first session started


def ignore_inherited_session() -> None:
    """For a program of its own (the command line): a parent's session does not govern it."""
    global _FROM_PARENT
    _FROM_PARENT = None


def _publish() -> None:
    """Export the innermost session, as a call would see it now (under ``_STACK_LOCK``);
    the variable is written only when it changes (a scope per test, most of them alike)."""
    value = _STACK[-1]._export() if _STACK else _ENV_BEFORE
    if value is None:
        os.environ.pop(ENV_SESSION, None)
    elif os.environ.get(ENV_SESSION) != value:
        os.environ[ENV_SESSION] = value


def _held_by(outer: Session | None, mode: str) -> str | None:
    """The mode an outer session imposes: replay always; off unless this one replays."""
    held = outer.mode_now() if outer is not None else None
    return held if held == "replay" or (held == "off" and mode != "replay") else None


def active_session() -> Session | None:
    """The session that governs calls in this process now, if any: the innermost one
    started here, else the one a parent process exported to this one's environment."""
    stack = _STACK
    if stack:
        return stack[-1]
    return _inherit(_FROM_PARENT) if _FROM_PARENT else None


def _inherit(exported: str) -> Session:
    with _STACK_LOCK:
        inherited = _INHERITED.get(exported)
        if inherited is None:
            try:
                settings = json.loads(exported)
                inherited = Session(
                    settings["store"], mode=settings["mode"], run_id=str(settings["run_id"]),
                    started=float(settings["started"]),
                    record_command=str(settings["record_command"]), http=settings.get("http"),
                    ttl=settings.get("ttl"))
            except (ValueError, KeyError, TypeError) as exc:  # never run a call ungoverned
                raise SingleflightError(
                    f"${ENV_SESSION} does not hold a session this library exported ({exc!r}); "
                    f"unset it, or start the session in this process") from None
            _INHERITED[exported] = inherited
        if inherited.http:
            _route_http()
        return inherited


def check_replayable(store: str | os.PathLike[str] | ReceiptStore | None,
                     secret: str | bytes | None, record_command: str) -> None:
    """A :class:`StoreError` naming the fix if replay on ``store`` cannot work: no store
    file, or no key to check its receipts with. Creates nothing."""
    from .signing import ENV_SECRET, key_path_for
    from .store import ReceiptStore, is_sqlite_url, sqlite_path

    keyed = secret is not None or bool(os.environ.get(ENV_SECRET))
    if isinstance(store, ReceiptStore):
        file = hasattr(store, "path")
        path = None if keyed else getattr(store, "path", None)
    else:
        file = is_sqlite_url(store)
        path = sqlite_path(store) if file else None
    if not file and not keyed:
        raise StoreError(f"replay needs the key that signed the receipts: set {ENV_SECRET} "
                         f"(a server store has no key file)")
    if path is not None and not path.is_file():
        raise StoreError(f"replay: receipt store {path} does not exist; record it first "
                         f"({record_command}) or copy it here with its key file "
                         f"{key_path_for(path).name}")
    if path is not None and not keyed and not key_path_for(path).is_file():
        raise StoreError(f"replay: the key of {path} is missing ({key_path_for(path)}); copy "
                         f"the key file beside the store, or set {ENV_SECRET} to its content")


def new_run_id(prefix: str = "") -> str:
    return prefix + time.strftime("%Y%m%dT%H%M%S-") + os.urandom(3).hex()


def _route_http() -> None:
    from .http_receipts import install

    install()


class Scope:
    """Calls attributed to one unit of work while it is open (e.g. one test)."""

    def __init__(self, name: str, mode: str | None = None, record_command: str | None = None,
                 on_outcome: Callable[[ExecutionOutcome], None] | None = None,
                 http: Iterable[str] | str = ()) -> None:
        if mode is not None:
            check_mode(mode, f"{name}: mode")
        self.name, self.mode, self.record_command = name, mode, record_command
        self.http = Hosts(http)
        self.on_outcome = on_outcome
        self.outcomes: list[ExecutionOutcome] = []
        self.misses: list[ReplayMissError] = []
        self.errors: list[Exception] = []  # raised by on_outcome


class Session:
    """A run's settings, for every engine in the process while active.

    ``store`` is a path, a URL or a :class:`ReceiptStore` (default
    ``.singleflight/receipts.db``); ``mode`` is ``record`` (serve receipts, run and record
    misses), ``replay`` (never run a shared call: a miss raises :class:`ReplayMissError`),
    ``refresh`` (run each distinct call once in this session, overwriting older receipts)
    or ``off`` (run every call, count the duplicates). ``run_id`` groups the statistics of
    every process of the run (else ``$SINGLEFLIGHT_RUN_ID``, else a fresh id). ``secret``
    and ``prices`` are as for :class:`Singleflight`. ``record_command`` is what a replay
    miss tells the user to run. ``http`` lists hosts (``api.openai.com``, any port;
    ``*.example.com``) whose requests, from any httpx or httpx2 client with its default
    transport, go through receipts while the session is active (see ``docs/http.md``);
    ``ttl`` is their receipts' lifetime in seconds (default one hour).
    Use it as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(self, store: str | os.PathLike[str] | ReceiptStore | None = None, *,
                 mode: str = "record", run_id: str | None = None,
                 secret: str | bytes | None = None, prices: PriceSource | PriceTable = None,
                 record_command: str | None = None, started: float | None = None,
                 http: Iterable[str] | str | None = None, ttl: float | None = None) -> None:
        from .models import ToolExecutionOptions
        from .pricing import PriceTable
        from .store import ReceiptStore, is_sqlite_url, sqlite_path

        self.mode = check_mode(mode, "session mode")
        if not isinstance(store, ReceiptStore) and is_sqlite_url(store):
            sqlite_path(store)  # a bad URL fails here, in every mode
        self.store = store
        self.run_id = check_text(run_id or os.environ.get(ENV_RUN_ID) or new_run_id(),
                                 "run id", f"pass run_id= or set ${ENV_RUN_ID} to plain text")
        self.started = time.time() if started is None else started
        self.secret = secret
        self.prices = PriceTable.load(prices)
        self.record_command = record_command or DEFAULT_RECORD_COMMAND
        self.http = Hosts(http or ())
        self.ttl = ttl
        if ttl is not None:
            ToolExecutionOptions(ttl_seconds=ttl)  # checked now, with the tools' own bounds
        self._engine: Singleflight | None = None
        self._lock = threading.Lock()
        self._used = False
        self._scopes: list[Scope] = []
        self._exported: tuple[str | None, list[str] | None, str] = (None, None, "")
        self.held_to: str | None = None  # an outer session's replay or off, which wins

    def start(self) -> Session:
        """Govern every engine in this process, and the processes it starts, from now on.

        Inside a session in ``replay`` (or ``off``, unless this one replays), this one runs
        in that mode too. In replay, a store or key that cannot be used stops here with a
        :class:`StoreError`, and no file is created. Starting a started session does nothing.
        """
        global _ENV_BEFORE
        if self in _STACK:
            return self
        self.held_to = _held_by(active_session(), self.mode)
        if self.run_mode == "replay":
            check_replayable(self.store, self.secret, self.record_command)
            self.engine.open_for_replay()  # a bad key or file says so now, once
        with _STACK_LOCK:
            if not _STACK:
                _ENV_BEFORE = os.environ.get(ENV_SESSION)
            _STACK.append(self)
            _publish()
        if self.http:
            _route_http()
        return self

    def stop(self) -> None:
        """Stop governing, write pending statistics and close the session's engine."""
        with _STACK_LOCK:
            if self in _STACK:
                _STACK.remove(self)
                _publish()  # whichever session was stopped, the innermost left is exported
            routed = any(s.http for s in _STACK) or (_FROM_PARENT is not None
                                                     and '"http": []' not in _FROM_PARENT)
        if not routed and "singleflight_agents.http_receipts" in sys.modules:
            sys.modules["singleflight_agents.http_receipts"].uninstall()
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            self._used = self._used or engine.opened
            engine.close()

    def flush_stats(self) -> None:
        """Write the statistics of this process's calls to the store now."""
        engine = self._engine
        if engine is not None and engine.opened:
            engine.flush_stats()

    def stored_summary(self) -> dict[str, Any] | None:
        """This run's statistics as the store holds them (every process of the run), or
        ``None`` if it holds none; never creates the store. Raises ``StoreError``."""
        from .stats import summarize
        from .store import ReceiptStore, is_sqlite_url, open_store, redact_url, sqlite_path

        where = self.store
        if not isinstance(where, ReceiptStore) and is_sqlite_url(where) \
                and not sqlite_path(where).exists():
            return None
        store = where if isinstance(where, ReceiptStore) else open_store(where)
        try:
            rows = store.load_stats(self.run_id)
        finally:
            if store is not where:
                store.close()
        return summarize(rows, db_path=redact_url(store.url), run_id=self.run_id) if rows else None

    @property
    def run_mode(self) -> str:
        """The session's mode, or the outer session's replay or off that holds it."""
        return self.held_to or self.mode

    @property
    def used(self) -> bool:
        """Whether a call of this session opened its store."""
        engine = self._engine
        return self._used or (engine is not None and engine.opened)

    def _export(self) -> str:
        from .store import ReceiptStore

        # Only the mode and hosts change while it runs: the text is kept for the last pair.
        # A URL's password goes along: the environment is the user's own, like its argv.
        scope, mode = self.current, self.mode_now()
        hosts = self.http_now().names() if scope is not None and scope.http else None
        if self._exported[:2] == (mode, hosts):
            return self._exported[2]
        store = self.store
        where = store.url if isinstance(store, ReceiptStore) else store
        text = json.dumps({"store": None if where is None else os.fspath(where), "mode": mode,
                           "run_id": self.run_id, "started": self.started,
                           "record_command": self.record_command,
                           "http": hosts if hosts is not None else self.http.names(),
                           "ttl": self.ttl})
        self._exported = (mode, hosts, text)
        return text

    __enter__ = start

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
                        refresh_since=self.started, prices=self.prices, mode=self.run_mode,
                        record_command=self.record_command, own_store=True)
                engine = self._engine
        return engine

    @contextlib.contextmanager
    def scope(self, name: str, *, mode: str | None = None, record_command: str | None = None,
              on_outcome: Callable[[ExecutionOutcome], None] | None = None,
              http: Iterable[str] | str = ()) -> Iterator[Scope]:
        """Attribute every call in the process to ``name`` until the block ends; ``http``
        adds hosts routed through receipts meanwhile."""
        opened = Scope(name, mode, record_command, on_outcome, http)
        if opened.http:
            _route_http()
        self._scopes.append(opened)
        self._republish()  # a scope's own mode reaches the processes it starts
        try:
            yield opened
        finally:
            self._scopes.remove(opened)
            self._republish()

    def _republish(self) -> None:
        with _STACK_LOCK:
            if _STACK and _STACK[-1] is self:
                _publish()

    @property
    def current(self) -> Scope | None:
        scopes = self._scopes
        return scopes[-1] if scopes else None

    def mode_now(self) -> str:
        """The mode of a call made now: the session's, unless it records or refreshes and
        the open scope asks for another."""
        scope, mode = self.current, self.run_mode
        return mode if scope is None or scope.mode is None or mode in ("replay", "off") \
            else scope.mode

    def http_now(self) -> Hosts:
        """The hosts routed through receipts now: the session's and the open scope's."""
        scope = self.current
        return self.http if scope is None or not scope.http else self.http | scope.http

    def record_command_now(self) -> str:
        return getattr(self.current, "record_command", None) or self.record_command

    def observe(self, outcome: ExecutionOutcome) -> None:
        scope = self.current
        if scope is not None:
            scope.outcomes.append(outcome)
            if scope.on_outcome is not None:
                try:
                    scope.on_outcome(outcome)
                except Exception as exc:  # the call succeeded: the observer's error is the scope's
                    scope.errors.append(exc)

    def missed(self, error: ReplayMissError) -> None:
        scope = self.current
        if scope is not None:
            scope.misses.append(error)


def report_miss(error: ReplayMissError) -> ReplayMissError:
    """``error``, also listed in the active session's scope: its test fails even if the agent
    or client that got the error swallows it."""
    active = active_session()
    if active is not None:
        active.missed(error)
    return error


def session(store: str | os.PathLike[str] | ReceiptStore | None = None, *, mode: str = "record",
            run_id: str | None = None, secret: str | bytes | None = None,
            prices: PriceSource | PriceTable = None, record_command: str | None = None,
            http: Iterable[str] | str | None = None, ttl: float | None = None) -> Session:
    """A :class:`Session` to use as ``with session("receipts.db", mode="replay"): ...``."""
    return Session(store, mode=mode, run_id=run_id, secret=secret, prices=prices,
                   record_command=record_command, http=http, ttl=ttl)


if _FROM_PARENT and '"http": []' not in _FROM_PARENT:
    # A parent's session routes hosts: this process's clients go through receipts from the
    # start. A variable that does not parse raises on this process's first call instead.
    with contextlib.suppress(SingleflightError):
        _inherit(_FROM_PARENT)
