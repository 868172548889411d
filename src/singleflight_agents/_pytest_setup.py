"""What the pytest plugin reads from a run's configuration and each test's markers, and the
``singleflight`` fixture it gives a test. The hooks are in :mod:`.pytest_plugin`."""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

from .models import check_mode

if TYPE_CHECKING:
    from .engine import Singleflight
    from .models import ExecutionOutcome, ToolExecutionOptions
    from .sessions import Scope, Session

_NOT_MARKER = {"tool_name", "key", "meter"}  # per tool, never per test


def marker_options(item: pytest.Item, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    from .models import OPTION_ALIASES, ToolExecutionOptions

    known = {f.name for f in dataclasses.fields(ToolExecutionOptions)} - _NOT_MARKER
    options = {}
    for name, value in kwargs.items():
        if name == "http":
            marker_hosts(item, value)
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


def marker_hosts(item: pytest.Item, value: Any) -> list[str]:
    """The marker's ``http=`` hosts: a list of host names, or one comma-separated string."""
    from ._http_keys import Hosts

    try:
        return Hosts(value).names()
    except (ValueError, TypeError) as exc:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.singleflight(http=...): {exc}; "
                                f"pass a list like ['api.openai.com']") from None


def hosts(ini: list[str], options: list[str]) -> list[str]:
    """The run's HTTP hosts: the ini file's and the command line's, each comma-separated."""
    from ._http_keys import Hosts

    return (Hosts(",".join(ini)) | Hosts(",".join(options))).names()


def record_command(db: str, item: pytest.Item | None = None) -> str:
    """What a replay miss tells the user to run: record this store (this test)."""
    from .store import redact_url

    command = f"pytest --singleflight-mode=record --singleflight-db={shlex.quote(redact_url(db))}"
    return command if item is None else f"{command} {shlex.quote(item.nodeid)}"


def from_rootdir(config: pytest.Config, path: str) -> str:
    """An ini file's relative path, from the rootdir (as pytest reads its own ini paths), so
    running from another directory finds the same store; URLs stay as they are."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    return str(config.rootpath / path)


class Run:
    """Per process: the configuration, and the library session it starts."""

    def __init__(self, config: pytest.Config) -> None:
        from .pricing import PriceTable
        from .sessions import ENV_RUN_ID, Session, new_run_id

        worker = getattr(config, "workerinput", {}).get("singleflight", {})
        self.db = config.getoption("singleflight_db") or from_rootdir(
            config, config.getini("singleflight_db") or ".singleflight/receipts.db")
        self._record_command = record_command(self.db)
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
        prices = config.getoption("singleflight_prices") or from_rootdir(
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
            http = hosts(config.getini("singleflight_http"), config.getoption("singleflight_http"))
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
        command = self._record_command  # the store's part, made once
        return command if item is None else f"{command} {shlex.quote(item.nodeid)}"

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

    def __init__(self, state: Run, item: pytest.Item, scope: Scope) -> None:
        self._state = state
        self._item = item
        self._scope = scope
        marker: dict[str, Any] = {}
        for mark in reversed(list(item.iter_markers("singleflight"))):  # closest wins
            marker.update(marker_options(item, mark.kwargs))
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
