"""The pytest plugin: options, the ``singleflight`` marker and fixture, and the report.

A thin layer over :class:`~singleflight_agents.Session`: the plugin starts one session per
process (the controller and every xdist worker, all with one run id), so every engine in
the process, the app's own included, runs on the session's store in the session's mode.
The store opens on first use: a test run that never makes a call opens nothing. Each test
is a scope of the session: calls made while it runs, from any thread or task, are its
outcomes, and a replay miss fails it even when agent code swallowed the error. After the
run the controller reads the run's statistics back from the store, so a crashed worker
loses at most its unsaved counts, never the report.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import math
import os
import shlex
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

from . import hookspecs
from .models import MODES, check_mode

if TYPE_CHECKING:
    from .engine import Singleflight
    from .models import ExecutionOutcome, ReplayMissError, ToolExecutionOptions
    from .sessions import Scope, Session

_NOT_MARKER = {"tool_name", "key", "meter"}  # per tool, never per test
_STATE = pytest.StashKey["_Run"]()
_TEST = pytest.StashKey["SingleflightFixture"]()
_SCOPE: pytest.StashKey[Scope] = pytest.StashKey()
_REPORTED = pytest.StashKey[int]()  # the test's misses already failed it
_EARLY = pytest.StashKey["Session"]()  # replay while conftest.py files are imported
_UNDO = pytest.StashKey[list[tuple[Any, str, Any]]]()  # patch= targets to restore


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
    group.addoption("--singleflight-http", metavar="HOST[,HOST...]", action="append", default=[],
                    help=("send every httpx/httpx2 request to these hosts (any port; "
                          "*.example.com for subdomains) through receipts, e.g. "
                          "api.openai.com,api.anthropic.com (repeatable; ini: singleflight_http)"))
    parser.addini("singleflight_db", "receipt store path or URL")
    parser.addini("singleflight_http", "hosts whose HTTP requests go through receipts",
                  type="args", default=[])
    parser.addini("singleflight_prices", "JSON price table for model turns")
    parser.addini("singleflight_mode", "record, replay, refresh or off", default="record")
    parser.addini("singleflight_ttl", "default receipt lifetime in seconds", default="3600")
    parser.addini("singleflight_report", "report files (.json, .md)", type="args", default=[])


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser,
                                  args: list[str]) -> None:
    """A replay run holds the calls made while conftest.py files are imported, before
    pytest_configure, to replay too: a session of the command line's store and mode until
    the run's own starts."""
    known = early_config.known_args_namespace
    mode = getattr(known, "singleflight_mode", None) or early_config.getini("singleflight_mode")
    if mode != "replay":
        return
    from .models import StoreError
    from .sessions import Session

    db = getattr(known, "singleflight_db", None) or _from_rootdir(
        early_config, early_config.getini("singleflight_db") or ".singleflight/receipts.db")
    try:
        http = _hosts(early_config.getini("singleflight_http"),
                      getattr(known, "singleflight_http", None) or [])
        early_config.stash[_EARLY] = Session(db, mode="replay", http=http,
                                             record_command=_record_command(db)).start()
    except (StoreError, ValueError) as exc:
        raise pytest.UsageError(f"singleflight: {exc}") from None


@pytest.hookimpl(tryfirst=True)  # before conftests' own pytest_configure make calls
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", (
        "singleflight(ttl=..., mode=..., patch=[...], http=[...], **options): defaults for this "
        "test's deduplicated tools; patch= replaces the named import paths by deduplicated "
        "wrappers; http= adds hosts whose requests go through receipts"))
    from .models import StoreError

    early = config.stash.get(_EARLY, None)
    if early is not None:
        early.stop()
    try:
        state = config.stash[_STATE] = _Run(config)
        state.session.start()
    except StoreError as exc:  # e.g. replay without a store: one line, before any test runs
        raise pytest.UsageError(f"singleflight: {exc}") from None


@pytest.hookimpl(trylast=True)  # after conftests' own pytest_unconfigure made their calls
def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Every call made while the test runs, from any thread or task, is the test's."""
    state = item.config.stash[_STATE]
    mode = None
    marks = list(item.iter_markers("singleflight"))
    for mark in marks:  # closest first
        mode = mark.kwargs.get("mode")
        if mode is not None:
            break
    http = [host for mark in marks for host in _marker_hosts(item, mark.kwargs.get("http", ()))]
    hook = item.ihook.pytest_singleflight_outcome
    with state.session.scope(item.nodeid, mode=mode, record_command=state.record_command(item),
                             on_outcome=lambda outcome: hook(item=item, outcome=outcome),
                             http=http) as scope:
        item.stash[_SCOPE] = scope
        try:
            return (yield)
        finally:
            del item.stash[_SCOPE]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A rerun (pytest-rerunfailures) starts with no outcomes and no misses."""
    scope = item.stash.get(_SCOPE, None)
    if scope is not None:
        scope.outcomes.clear()
        scope.misses.clear()
        scope.errors.clear()
    item.stash[_REPORTED] = 0
    _patch(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """A replay miss fails its test even when agent code caught the error (the Agents SDK,
    for one, hands a failing tool's error to the model as a message)."""
    return _failing_on_misses(item, (yield))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Also a miss swallowed in a fixture's teardown."""
    try:
        result = yield
    finally:
        _unpatch(item)
    return _failing_on_misses(item, result)


def _failing_on_misses(item: pytest.Item, result: Any) -> Any:
    scope = item.stash.get(_SCOPE, None)
    seen = item.stash.get(_REPORTED, 0)
    if scope is not None and len(scope.misses) > seen:
        item.stash[_REPORTED] = len(scope.misses)
        pytest.fail(_misses_text(scope.misses[seen:]), pytrace=False)
    if scope is not None and scope.errors:  # a pytest_singleflight_outcome hook raised
        errors, scope.errors = scope.errors, []
        pytest.fail("\n".join(f"pytest_singleflight_outcome raised {type(e).__name__}: {e}"
                              for e in errors), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    scope = item.stash.get(_SCOPE, None)
    if call.when == "call" and scope is not None and scope.misses:
        # Shown even when the test failed on something else (an answer a model made up).
        report.sections.append(("singleflight replay misses", _misses_text(scope.misses)))
        item.stash[_REPORTED] = len(scope.misses)
    return report


def _misses_text(misses: list[ReplayMissError]) -> str:
    # An SDK retries what it takes for a network error: the same miss, listed once.
    counts = collections.Counter(str(miss) for miss in misses)
    return "\n".join(["singleflight: calls with no receipt to replay, so they did not run:",
                      *(f"  {text}" + (f" ({n} attempts)" if n > 1 else "")
                        for text, n in counts.items())])


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
        from .models import ToolExecutionOptions

        try:  # a bad value fails the collection in one line, not each test at its first call
            ToolExecutionOptions().replace(**_marker_options(item, mark.kwargs))
        except (TypeError, ValueError) as exc:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.singleflight: {exc}") from None


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash[_STATE]
    state.flush()  # workers write their counts before the report
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["singleflight_used"] = state.used


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist: the controller reports if any worker used the plugin (or crashed,
    maybe after using it: its counts up to then are in the store)."""
    if error or getattr(node, "workeroutput", {}).get("singleflight_used"):
        node.config.stash[_STATE].worker_used = True


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return  # the controller reports for everyone
    state = config.stash[_STATE]
    for problem in state.problems:
        terminalreporter.write_line(f"singleflight: warning: {problem}")
    summary = state.summary()
    if summary is None:
        return
    from .reporting import append_step_summary, format_line, format_summary, write_report

    mode = state.session.run_mode  # the mode the run had (an outer replay session holds it)

    if config.get_verbosity() < 0:
        terminalreporter.write_line(format_line(summary, mode))
    else:
        terminalreporter.write_sep("=", "singleflight")
        terminalreporter.write_line(format_summary(summary, mode, prices=state.session.prices))
    for target in state.reports:
        write_report(target, summary, mode)
    append_step_summary(summary, mode)


@pytest.fixture
def singleflight(request: pytest.FixtureRequest) -> SingleflightFixture:
    """Deduplicated tools for this test: ``wrap``, ``tool``, ``execute``, ``outcomes``."""
    return _for_test(request.node)


def _patch(item: pytest.Item) -> None:
    """Replace the marker's ``patch=`` targets by deduplicated wrappers; :func:`_unpatch`
    restores them. Hooks, not an autouse fixture: an unmarked test pays nothing."""
    targets = dict.fromkeys(  # one wrapper per target, however many markers name it
        t for m in item.iter_markers("singleflight") for t in m.kwargs.get("patch", ()))
    undo = item.stash[_UNDO] = []
    for target in targets:
        module_name, _, name = target.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            original = getattr(module, name)
        except (ImportError, AttributeError, ValueError):
            original = module = None
        if module is None:  # outside the except: one line, no chained traceback
            pytest.fail(f"{item.nodeid}: singleflight patch target {target!r} is not an "
                        f"importable module attribute", pytrace=False)
        if hasattr(original, "singleflight_options"):
            continue  # an engine's tool already: the session governs it with its own flags
        undo.append((module, name, original))
        setattr(module, name, _for_test(item).wrap(original, tool_name=target))


def _unpatch(item: pytest.Item) -> None:
    undo = item.stash.get(_UNDO, [])
    for module, name, original in reversed(undo):
        setattr(module, name, original)
    item.stash[_UNDO] = []
    if _TEST in item.stash:  # a rerun gets a fixture of its own
        del item.stash[_TEST]


def _for_test(item: pytest.Item) -> SingleflightFixture:
    fixture = item.stash.get(_TEST, None)
    if fixture is None:
        fixture = item.stash[_TEST] = SingleflightFixture(item.config.stash[_STATE], item)
    return fixture


def _marker_options(item: pytest.Item, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    from .models import OPTION_ALIASES, ToolExecutionOptions

    known = {f.name for f in dataclasses.fields(ToolExecutionOptions)} - _NOT_MARKER
    options = {}
    for name, value in kwargs.items():
        if name == "http":
            _marker_hosts(item, value)
            continue
        if name == "patch":
            if isinstance(value, str) or not all(isinstance(t, str) for t in value):
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.singleflight(patch=...) "
                                        f"takes a list of import paths like ['pkg.mod.func']")
            continue
        if name == "mode":  # the test's, not a tool's: a session in replay or off wins
            try:
                check_mode(value, f"{item.nodeid}: @pytest.mark.singleflight(mode=...)")
            except ValueError as exc:
                raise pytest.UsageError(str(exc)) from None
            continue
        field = OPTION_ALIASES.get(name, name)
        if field not in known:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.singleflight got unknown keyword {name!r}; "
                f"known: mode, patch, http, {', '.join(sorted(known | set(OPTION_ALIASES)))}")
        options[field] = value
    return options


def _marker_hosts(item: pytest.Item, value: Any) -> list[str]:
    """The marker's ``http=`` hosts: a list of host names, or one comma-separated string."""
    from ._http_keys import Hosts

    try:
        return Hosts(value).names()
    except (ValueError, TypeError) as exc:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.singleflight(http=...): {exc}; "
                                f"pass a list like ['api.openai.com']") from None


def _hosts(ini: list[str], options: list[str]) -> list[str]:
    """The run's HTTP hosts: the ini file's and the command line's, each comma-separated."""
    from ._http_keys import Hosts

    return (Hosts(",".join(ini)) | Hosts(",".join(options))).names()


def _record_command(db: str, item: pytest.Item | None = None) -> str:
    """What a replay miss tells the user to run: record this store (this test)."""
    from .store import redact_url

    command = f"pytest --singleflight-mode=record --singleflight-db={shlex.quote(redact_url(db))}"
    return command if item is None else f"{command} {shlex.quote(item.nodeid)}"


def _from_rootdir(config: pytest.Config, path: str) -> str:
    """An ini file's relative path, from the rootdir (as pytest reads its own ini paths), so
    running from another directory finds the same store; URLs stay as they are."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    return str(config.rootpath / path)


class _Run:
    """Per process: the configuration, and the library session it starts."""

    def __init__(self, config: pytest.Config) -> None:
        from .pricing import PriceTable
        from .sessions import ENV_RUN_ID, Session, new_run_id

        worker = getattr(config, "workerinput", {}).get("singleflight", {})
        self.db = config.getoption("singleflight_db") or _from_rootdir(
            config, config.getini("singleflight_db") or ".singleflight/receipts.db")
        self.mode: str = config.getoption("singleflight_mode") or config.getini("singleflight_mode")
        try:
            check_mode(self.mode, "singleflight_mode")
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        ttl = config.getoption("singleflight_ttl")
        ttl = config.getini("singleflight_ttl") if ttl is None else ttl
        try:
            self.ttl = float(ttl)
        except ValueError:
            self.ttl = math.nan
        from .models import ToolExecutionOptions

        try:  # the tools' own bounds, checked once here rather than at every test's first wrap
            ToolExecutionOptions(ttl_seconds=self.ttl)
        except ValueError:
            raise pytest.UsageError(f"singleflight_ttl = {ttl!r}: give a positive number of "
                                    f"seconds, at most 315360000 (10 years)") from None
        prices = config.getoption("singleflight_prices") or _from_rootdir(
            config, config.getini("singleflight_prices"))
        try:
            table = PriceTable.load(prices or None)
        except ValueError as exc:
            raise pytest.UsageError(f"singleflight prices: {exc}") from None
        self.reports = [*config.getini("singleflight_report"),
                        *config.getoption("singleflight_report")]
        for target in self.reports:
            if not target.endswith((".json", ".md")):
                raise pytest.UsageError(f"singleflight report {target!r}: name a .json or .md "
                                        f"file")
        try:
            http = _hosts(config.getini("singleflight_http"), config.getoption("singleflight_http"))
        except ValueError as exc:
            raise pytest.UsageError(f"singleflight http: {exc}") from None
        self.session: Session = Session(
            self.db, mode=self.mode, http=http, ttl=self.ttl,
            run_id=worker.get("run_id") or os.environ.get(ENV_RUN_ID) or new_run_id("pytest-"),
            prices=table, started=worker.get("started"), record_command=self.record_command())
        self.run_id, self.started = self.session.run_id, self.session.started
        self.worker_used = False  # on the xdist controller: a worker used the plugin
        self.problems: list[str] = []

    @property
    def used(self) -> bool:
        return self.session.used or self.worker_used

    def record_command(self, item: pytest.Item | None = None) -> str:
        return _record_command(self.db, item)

    def summary(self) -> dict[str, Any] | None:
        """This run's statistics from the store, or ``None`` if nothing used it."""
        if not self.used:
            return None
        from .models import StoreError

        try:
            return self.session.stored_summary()
        except StoreError as exc:
            self.problems.append(f"no report: {exc}")
            return None

    def flush(self) -> None:
        from .models import StoreError

        try:
            self.session.flush_stats()
        except StoreError as exc:
            self.problems.append(f"statistics not written: {exc}")

    def close(self) -> None:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.session.stop()  # warns, does not raise, when the store is gone
        self.problems.extend(str(w.message) for w in caught)


class SingleflightFixture:
    """What the ``singleflight`` fixture gives a test: a view of the run's session.

    ``wrap(func, **options)`` returns a deduplicated version of ``func`` (sync stays sync,
    async stays async); ``tool(**options)`` is the same as a decorator; ``execute`` and
    ``execute_sync`` make one call, ``do`` and ``do_sync`` one call keyed on an identity
    (see ``Singleflight.do``), and return its :class:`ExecutionOutcome`. Options are
    :class:`ToolExecutionOptions` fields (``ttl=``, ``cost=`` as aliases); the marker's
    keywords and the command line give the defaults. As everywhere, a tool is shared only
    when it says ``deterministic=True`` or ``bounded_read=True``. ``outcomes`` lists every
    call this test made, through the fixture or any other engine, in order; ``stats``
    counts them.
    """

    def __init__(self, state: _Run, item: pytest.Item) -> None:
        self._state = state
        self._item = item
        self._scope = item.stash[_SCOPE]
        marker: dict[str, Any] = {}
        for mark in reversed(list(item.iter_markers("singleflight"))):  # closest wins
            marker.update(_marker_options(item, mark.kwargs))
        self._defaults = {"ttl_seconds": state.ttl, **marker}

    @property
    def engine(self) -> Singleflight:
        return self._state.session.engine

    @property
    def outcomes(self) -> list[ExecutionOutcome]:
        return self._scope.outcomes

    def options(self, func: Callable[..., Any], **overrides: Any) -> ToolExecutionOptions:
        """The options a tool wrapped here gets, after the plugin's hooks."""
        from .models import OPTION_ALIASES, ToolExecutionOptions

        overrides = {OPTION_ALIASES.get(name, name): value for name, value in overrides.items()}
        options = ToolExecutionOptions().replace(**{**self._defaults, **overrides})
        hooked = self._item.config.hook.pytest_singleflight_tool_options(
            item=self._item, func=func, options=options)
        return hooked if hooked is not None else options

    def wrap(self, func: Callable[..., Any], **options: Any) -> Any:
        opts = self.options(func, **options)
        return self.engine.tool(func, **{f.name: getattr(opts, f.name)
                                         for f in dataclasses.fields(opts)})

    def tool(self, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        return lambda func: self.wrap(func, **options)

    async def execute(self, func: Callable[..., Any], /, *args: Any,
                      options: ToolExecutionOptions | None = None, **kwargs: Any) -> ExecutionOutcome:
        return await self.engine.execute(func, *args, options=options or self.options(func),
                                         **kwargs)

    def execute_sync(self, func: Callable[..., Any], /, *args: Any,
                     options: ToolExecutionOptions | None = None, **kwargs: Any) -> ExecutionOutcome:
        return self.engine.execute_sync(func, *args, options=options or self.options(func),
                                        **kwargs)

    async def do(self, tool_name: str, identity: Any, fn: Callable[[], Any], /, *,
                 options: ToolExecutionOptions | None = None) -> ExecutionOutcome:
        return await self.engine.do(tool_name, identity, fn, options=options or self.options(fn))

    def do_sync(self, tool_name: str, identity: Any, fn: Callable[[], Any], /, *,
                options: ToolExecutionOptions | None = None) -> ExecutionOutcome:
        return self.engine.do_sync(tool_name, identity, fn, options=options or self.options(fn))

    @property
    def stats(self) -> dict[str, Any]:
        """This test's calls by source, and what the shared ones saved."""
        sources = Counter(str(o.source) for o in self.outcomes)
        saved = [o for o in self.outcomes if o.source in ("cache_hit", "shared_wait")]
        return {"calls": len(self.outcomes), **sources,
                "dollars_saved": sum(o.dollars_saved for o in saved),
                "latency_saved_ms": sum(o.receipt.latency_ms for o in saved if o.receipt)}
