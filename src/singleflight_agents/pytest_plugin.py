"""The pytest plugin: options, the ``singleflight`` marker and fixture, and the report.

A thin layer over :class:`Singleflight`: one engine per process, created on first use,
so a test session that never uses the plugin opens no store. Under pytest-xdist every
worker has its own engine on the same store; the controller hands them one run id and
one session start, and after the session reads the run's statistics back from the
store, so a crashed worker loses at most its unsaved counts, never the report.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import shlex
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import hookspecs

if TYPE_CHECKING:
    from .engine import Singleflight
    from .models import ExecutionOutcome, ToolExecutionOptions

MODES = ("record", "replay", "refresh", "off")
_ALIASES = {"ttl": "ttl_seconds", "cost": "estimated_cost_usd"}
_NOT_MARKER = {"tool_name", "key", "record_command", "meter"}  # per tool, never per test
_STATE = pytest.StashKey["_Session"]()
_TEST = pytest.StashKey["SingleflightFixture"]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("singleflight", "singleflight-agents: shared, recorded tool calls")
    group.addoption("--singleflight-db", metavar="PATH", help=(
        "receipt store: a path or sqlite:/// URL (ini: singleflight_db; default: "
        ".singleflight/receipts.db under the rootdir)"))
    group.addoption("--singleflight-mode", choices=MODES, help=(
        "record: serve receipts, run and record misses (default); replay: never run a shared "
        "tool, a missing receipt fails the test; refresh: run each distinct call once and "
        "overwrite old receipts; off: run everything, only count duplicates "
        "(ini: singleflight_mode)"))
    group.addoption("--singleflight-ttl", metavar="SECONDS", type=float, help=(
        "default receipt lifetime for the session's tools (ini: singleflight_ttl; default 3600)"))
    group.addoption("--singleflight-report", metavar="FILE", action="append", default=[], help=(
        "also write the report to FILE: .json or .md (repeatable; ini: singleflight_report). "
        "The Markdown report also goes to $GITHUB_STEP_SUMMARY when that is set"))
    group.addoption("--singleflight-prices", metavar="FILE", help=(
        "JSON price table for model turns, dollars per million tokens: "
        '{"gpt-4.1": {"input": 2.0, "output": 8.0}} (ini: singleflight_prices; default: '
        "$SINGLEFLIGHT_PRICES)"))
    parser.addini("singleflight_db", "receipt store path or URL")
    parser.addini("singleflight_prices", "JSON price table for model turns")
    parser.addini("singleflight_mode", "record, replay, refresh or off", default="record")
    parser.addini("singleflight_ttl", "default receipt lifetime in seconds", default="3600")
    parser.addini("singleflight_report", "report files (.json, .md)", type="args", default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", (
        "singleflight(ttl=..., mode=..., patch=[...], **options): defaults for this test's "
        "deduplicated tools; patch= replaces the named import paths by deduplicated wrappers"))
    config.stash[_STATE] = _Session(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: every worker joins the controller's run."""
    state = node.config.stash[_STATE]
    node.workerinput["singleflight"] = {"run_id": state.run_id, "started": state.started}


def pytest_itemcollected(item: pytest.Item) -> None:
    for mark in item.iter_markers("singleflight"):
        if mark.args:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.singleflight takes keywords "
                                    f"only, got {mark.args!r}")
        _marker_options(item, mark.kwargs)


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash[_STATE]
    state.close()  # workers write their counts before the report
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["singleflight_used"] = state.used


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist: the controller reports if any worker used the plugin (or crashed,
    maybe after using it: its counts up to then are in the store)."""
    if error or getattr(node, "workeroutput", {}).get("singleflight_used"):
        node.config.stash[_STATE].used = True


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return  # the controller reports for everyone
    state = config.stash[_STATE]
    for problem in state.problems:
        terminalreporter.write_line(f"singleflight: warning: {problem}")
    summary = state.summary()
    if summary is None:
        return
    from .reporting import format_line, format_markdown, format_summary

    if config.get_verbosity() < 0:
        terminalreporter.write_line(format_line(summary, state.mode))
    else:
        terminalreporter.write_sep("=", "singleflight")
        terminalreporter.write_line(format_summary(summary, state.mode))
    for target in state.reports:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps({"mode": state.mode, **summary}, indent=2, sort_keys=True))
        else:
            path.write_text(format_markdown(summary, state.mode))
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a") as handle:
            handle.write(format_markdown(summary, state.mode))


@pytest.fixture
def singleflight(request: pytest.FixtureRequest) -> SingleflightFixture:
    """Deduplicated tools for this test: ``wrap``, ``tool``, ``execute``, ``outcomes``."""
    return _for_test(request.node)


@pytest.fixture(autouse=True)
def _singleflight_patch(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Apply the marker's ``patch=`` targets for this test (restored afterwards), and
    forget the test's outcomes when it ends (a rerun starts afresh)."""
    targets = dict.fromkeys(  # one wrapper per target, however many markers name it
        t for m in request.node.iter_markers("singleflight") for t in m.kwargs.get("patch", ()))
    try:
        _patch(request, monkeypatch, list(targets))
        yield
    finally:
        if _TEST in request.node.stash:
            del request.node.stash[_TEST]


def _patch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
           targets: list[str]) -> None:
    if not targets:
        return
    fixture = _for_test(request.node)
    for target in targets:
        module_name, _, name = target.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            original = getattr(module, name)
        except (ImportError, AttributeError, ValueError):
            raise pytest.UsageError(f"{request.node.nodeid}: singleflight patch target "
                                    f"{target!r} is not an importable module attribute") from None
        monkeypatch.setattr(module, name, fixture.wrap(original, tool_name=target))


def _for_test(item: pytest.Item) -> SingleflightFixture:
    fixture = item.stash.get(_TEST, None)
    if fixture is None:
        fixture = item.stash[_TEST] = SingleflightFixture(item.config.stash[_STATE], item)
    return fixture


def _marker_options(item: pytest.Item, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    from .models import ToolExecutionOptions

    known = {f.name for f in dataclasses.fields(ToolExecutionOptions)} - _NOT_MARKER
    options = {}
    for name, value in kwargs.items():
        if name == "patch":
            if isinstance(value, str) or not all(isinstance(t, str) for t in value):
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.singleflight(patch=...) "
                                        f"takes a list of import paths like ['pkg.mod.func']")
            continue
        field = _ALIASES.get(name, name)
        if field not in known:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.singleflight got unknown keyword {name!r}; "
                f"known: patch, {', '.join(sorted(known | set(_ALIASES)))}")
        options[field] = value
    return options


def _from_rootdir(config: pytest.Config, path: str) -> str:
    """An ini file's relative path, from the rootdir (as pytest reads its own ini paths), so
    running from another directory finds the same store; URLs stay as they are."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    return str(config.rootpath / path)


class _Session:
    """Per process: the configuration, and the engine once a test needs it."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        worker = getattr(config, "workerinput", {}).get("singleflight", {})
        self.run_id: str = worker.get("run_id") or (
            time.strftime("pytest-%Y%m%dT%H%M%S-") + os.urandom(3).hex())
        self.started: float = worker.get("started") or time.time()
        self.db = config.getoption("singleflight_db") or _from_rootdir(
            config, config.getini("singleflight_db") or ".singleflight/receipts.db")
        self.mode: str = config.getoption("singleflight_mode") or config.getini("singleflight_mode")
        if self.mode not in MODES:
            raise pytest.UsageError(f"singleflight_mode = {self.mode!r}; use one of "
                                    f"{', '.join(MODES)}")
        ttl = config.getoption("singleflight_ttl") or config.getini("singleflight_ttl")
        try:
            self.ttl = float(ttl)
        except ValueError:
            raise pytest.UsageError(f"singleflight_ttl = {ttl!r} is not a number of seconds") from None
        prices = config.getoption("singleflight_prices") or _from_rootdir(
            config, config.getini("singleflight_prices"))
        from .pricing import PriceTable

        try:
            self.prices = PriceTable.load(prices or None)
        except ValueError as exc:
            raise pytest.UsageError(f"singleflight prices: {exc}") from None
        self.reports = [*config.getini("singleflight_report"),
                        *config.getoption("singleflight_report")]
        self._engine: Singleflight | None = None
        self._lock = threading.Lock()
        self.used = False  # by this process, or (on the xdist controller) by a worker
        self.problems: list[str] = []

    def engine(self) -> Singleflight:
        with self._lock:  # the first calls may come from several threads at once
            if self._engine is None:
                from .engine import Singleflight

                self._engine = Singleflight(self.db, run_id=self.run_id,
                                            refresh_since=self.started, prices=self.prices)
                self.used = True
            return self._engine

    def summary(self) -> dict[str, Any] | None:
        """This run's statistics from the store, or ``None`` if nothing used it."""
        if not self.used:
            return None
        from .models import StoreError
        from .stats import summarize
        from .store import open_store, redact_url

        try:
            store = open_store(self.db)
            try:
                rows = store.load_stats(self.run_id)
            finally:
                store.close()
        except StoreError as exc:
            self.problems.append(f"no report: {exc}")
            return None
        return summarize(rows, db_path=redact_url(store.url), run_id=self.run_id) if rows else None

    def close(self) -> None:
        if self._engine is not None:
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._engine.close()  # warns, does not raise, when the store is gone
            self.problems.extend(str(w.message) for w in caught)
            self._engine = None


class SingleflightFixture:
    """What the ``singleflight`` fixture gives a test.

    ``wrap(func, **options)`` returns a deduplicated version of ``func`` (sync stays sync,
    async stays async); ``tool(**options)`` is the same as a decorator; ``execute`` and
    ``execute_sync`` make one call and return its :class:`ExecutionOutcome`. Options are
    :class:`ToolExecutionOptions` fields (``ttl=`` for ``ttl_seconds``); the marker's
    keywords and the command line give the defaults. ``outcomes`` lists this test's
    outcomes in order; ``stats`` counts them.
    """

    def __init__(self, session: _Session, item: pytest.Item) -> None:
        self._session = session
        self._item = item
        self.outcomes: list[ExecutionOutcome] = []
        marker: dict[str, Any] = {}
        for mark in reversed(list(item.iter_markers("singleflight"))):  # closest wins
            marker.update(_marker_options(item, mark.kwargs))
        self._defaults = {"ttl_seconds": session.ttl, "mode": session.mode, **marker,
                          "record_command": self._record_command()}

    @property
    def engine(self) -> Singleflight:
        return self._session.engine()

    def options(self, func: Callable[..., Any], **overrides: Any) -> ToolExecutionOptions:
        """The options a tool wrapped here gets, after the plugin's hooks."""
        from .models import ToolExecutionOptions

        merged = {**self._defaults, **{_ALIASES.get(k, k): v for k, v in overrides.items()}}
        if self._session.mode in ("replay", "off"):
            merged["mode"] = self._session.mode  # a CI replay never runs a paid tool
        if not any(merged.get(flag) for flag in ("deterministic", "bounded_read", "side_effecting")):
            merged["bounded_read"] = True  # wrapping a tool here says it is safe to share
        options = ToolExecutionOptions().replace(**merged)
        hooked = self._item.config.hook.pytest_singleflight_tool_options(
            item=self._item, func=func, options=options)
        return hooked if hooked is not None else options

    def wrap(self, func: Callable[..., Any], **options: Any) -> Any:
        opts = self.options(func, **options)
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                return (await self._execute(func, args, kwargs, opts)).value
            return run_async

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            return self._execute_sync(func, args, kwargs, opts).value
        return run

    def tool(self, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        return lambda func: self.wrap(func, **options)

    async def execute(self, func: Callable[..., Any], /, *args: Any,
                      options: ToolExecutionOptions | None = None, **kwargs: Any) -> ExecutionOutcome:
        return await self._execute(func, args, kwargs, options or self.options(func))

    def execute_sync(self, func: Callable[..., Any], /, *args: Any,
                     options: ToolExecutionOptions | None = None, **kwargs: Any) -> ExecutionOutcome:
        return self._execute_sync(func, args, kwargs, options or self.options(func))

    @property
    def stats(self) -> dict[str, Any]:
        """This test's calls by source, and what the shared ones saved."""
        sources = Counter(str(o.source) for o in self.outcomes)
        saved = [o for o in self.outcomes if o.source in ("cache_hit", "shared_wait")]
        return {"calls": len(self.outcomes), **sources,
                "dollars_saved": sum(o.receipt.cost_usd for o in saved if o.receipt),
                "latency_saved_ms": sum(o.receipt.latency_ms for o in saved if o.receipt)}

    async def _execute(self, func: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any], options: ToolExecutionOptions) -> ExecutionOutcome:
        return self._record(await self.engine.execute(func, *args, options=options, **kwargs))

    def _execute_sync(self, func: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any], options: ToolExecutionOptions) -> ExecutionOutcome:
        return self._record(self.engine.execute_sync(func, *args, options=options, **kwargs))

    def _record(self, outcome: ExecutionOutcome) -> ExecutionOutcome:
        self.outcomes.append(outcome)
        self._item.config.hook.pytest_singleflight_outcome(item=self._item, outcome=outcome)
        return outcome

    def _record_command(self) -> str:
        from .store import redact_url

        return (f"pytest --singleflight-mode=record --singleflight-db="
                f"{shlex.quote(redact_url(self._session.db))} {shlex.quote(self._item.nodeid)}")
