"""Hooks the pytest plugin adds (``pytest_addhooks``); implement them in a conftest.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import pytest

    from .models import ExecutionOutcome, ToolExecutionOptions

hookspec = pluggy.HookspecMarker("pytest")


@hookspec(firstresult=True)
def pytest_singleflight_tool_options(
    item: pytest.Item, func: Callable[..., Any], options: ToolExecutionOptions
) -> ToolExecutionOptions | None:
    """Adjust the options of a tool wrapped for ``item``.

    Called once per ``singleflight.wrap`` / ``.tool`` / ``.execute`` and per ``patch=``
    target, after the marker's defaults were applied. Return new options (e.g.
    ``options.replace(scope="nightly")``) or ``None`` to keep them.
    """


@hookspec
def pytest_singleflight_outcome(item: pytest.Item, outcome: ExecutionOutcome) -> None:
    """Called with every outcome of a call made while ``item`` runs, by any engine in the
    process (its threads and tasks too): for custom reports, budgets or assertions."""
