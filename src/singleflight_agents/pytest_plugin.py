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
import importlib
from typing import TYPE_CHECKING, Any

import pytest

from . import hookspecs
from ._pytest_setup import (
    Run,
    SingleflightFixture,
    from_rootdir,
    hosts,
    marker_hosts,
    marker_options,
    record_command,
)
from .models import MODES

if TYPE_CHECKING:
    from .models import ReplayMissError
    from .sessions import Scope, Session  # noqa: F401  (named in a stash key)

_STATE = pytest.StashKey["Run"]()
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

    db = getattr(known, "singleflight_db", None) or from_rootdir(
        early_config, early_config.getini("singleflight_db") or ".singleflight/receipts.db")
    try:
        http = hosts(early_config.getini("singleflight_http"),
                      getattr(known, "singleflight_http", None) or [])
        early_config.stash[_EARLY] = Session(db, mode="replay", http=http,
                                             record_command=record_command(db)).start()
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
        state = config.stash[_STATE] = Run(config)
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
    http = [host for mark in marks for host in marker_hosts(item, mark.kwargs.get("http", ()))]
    hook = item.ihook.pytest_singleflight_outcome
    on_outcome = (lambda outcome: hook(item=item, outcome=outcome)) \
        if hook.get_hookimpls() else None  # no implementation: no hook call per outcome
    with state.session.scope(item.nodeid, mode=mode, record_command=state.record_command(item),
                             on_outcome=on_outcome, http=http) as scope:
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
            ToolExecutionOptions().replace(**marker_options(item, mark.kwargs))
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
        fixture = item.stash[_TEST] = SingleflightFixture(item.config.stash[_STATE], item,
                                                          item.stash[_SCOPE])
    return fixture
