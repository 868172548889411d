"""What both swap plugins share: the engine the swapped-in adapters run on, a fresh store per
test, names for the functions and models they wrap, and the log of schema comparisons.

Each test runs inside a :class:`~singleflight_agents.Session` of its own on a new SQLite
file: every engine in the process (the one the tools were built with at import time
included) then runs on that file, so a receipt never crosses from one test to the next, as
it would not in a suite whose tests build their own tools.

``$COMPAT_FLAG`` picks the policy: ``deterministic`` (the default: identical calls share one
execution, the run CI makes) or ``side_effecting`` (every call runs: the control run, which
tells a failure of deduplication from a failure of the wrapping itself).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from singleflight_agents import Session, Singleflight

FLAG = os.environ.get("COMPAT_FLAG", "deterministic")
if FLAG not in ("deterministic", "side_effecting"):
    raise pytest.UsageError(f"$COMPAT_FLAG must be deterministic or side_effecting, not {FLAG!r}")
OPTIONS: dict[str, Any] = {FLAG: True}
# Fixed, so that no key file is written beside the per-test stores.
SECRET = "compat-" + "0" * 32

_BASE = Path(tempfile.mkdtemp(prefix="singleflight-compat-"))
# The engine the adapters are given at build time. Outside a test (a tool called while a
# module is imported) it runs on a store of its own; inside one, on the test's session.
ENGINE = Singleflight(store=_BASE / "outside-tests.db", secret=SECRET)

_numbers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_strong: dict[int, tuple[Any, int]] = {}  # objects that take no weak reference
_counter = itertools.count(1)


def unique_name(prefix: str, obj: Any) -> str:
    """A name for ``obj`` that no other live object gets: one function, tool or model keeps
    its receipts, two closures of one factory (which capture different values) do not share
    them. An object that is wrapped twice gets its name again."""
    func = getattr(obj, "__func__", obj)  # a bound method: its function is the identity
    try:
        number = _numbers.get(func)
        if number is None:
            number = _numbers[func] = next(_counter)
    except TypeError:
        held = _strong.get(id(func))
        if held is None or held[0] is not func:
            held = _strong[id(func)] = (func, next(_counter))
        number = held[1]
    label = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"compat.{prefix}.{label}#{number}"


def log_schema(kind: str, name: str, difference: str | None, *, shared: bool = True) -> None:
    """One line per tool built, in ``$COMPAT_SCHEMA_LOG``: what the model sees of the tool
    made by our adapter, against the framework's own tool made from the same arguments."""
    path = os.environ.get("COMPAT_SCHEMA_LOG")
    if not path:
        return
    line = json.dumps({"kind": kind, "name": name, "difference": difference, "shared": shared})
    with open(path, "a", encoding="utf-8") as f:  # one write per line: workers may append at once
        f.write(line + "\n")


def first_difference(ours: Any, theirs: Any, where: str = "") -> str | None:
    """Where two JSON-like values first differ, or ``None``."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs), key=str):
            if key not in ours or key not in theirs:
                return f"{where}.{key}: only in {'ours' if key in ours else 'theirs'}"
            found = first_difference(ours[key], theirs[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            found = first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if ours == theirs else f"{where or 'value'}: {ours!r:.120} != {theirs!r:.120}"


@pytest.fixture(autouse=True)
def _singleflight_store_per_test() -> Iterator[None]:
    folder = Path(tempfile.mkdtemp(dir=_BASE))
    session = Session(store=folder / "receipts.db", secret=SECRET).start()
    try:
        yield
    finally:
        session.stop()
        shutil.rmtree(folder, ignore_errors=True)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Each test's outcome, in ``$COMPAT_OUTCOMES`` (compat/check.py reads it): the call's,
    or a failed or skipped setup, or a failed teardown. Under xdist the controller gets every
    worker's reports; the workers write nothing."""
    if report.when == "call" or report.failed or report.skipped:
        _write_outcome(report.nodeid, "skipped" if report.skipped else report.outcome)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module that cannot be collected is a failure of its own (its tests never ran)."""
    if report.failed:
        _write_outcome(report.nodeid, "failed")


def _write_outcome(nodeid: str, outcome: str) -> None:
    path = os.environ.get("COMPAT_OUTCOMES")
    if path and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps([nodeid, outcome]) + "\n")


def pytest_report_header() -> str:
    return f"singleflight compat: adapters swapped in, {FLAG}=True, a fresh store per test"


def pytest_unconfigure() -> None:
    ENGINE.close()
    shutil.rmtree(_BASE, ignore_errors=True)
