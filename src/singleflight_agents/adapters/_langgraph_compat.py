"""Every place the LangGraph adapter reaches into LangGraph beyond its public API (checked
against langgraph 1.2 and langgraph-prebuilt 1.1): when a release moves one, this module is
what changes.

- Which of a tool's arguments ``ToolNode`` injects, and from where (state fields, the store,
  the runtime): ``ToolNode``'s own analysis, so the adapter sees exactly what it injects.
- The run's stream writer: the runtime LangGraph keeps in the run's config, read by
  ``get_stream_writer()``; a copy of the config with a runtime of another writer makes the
  tool or node write to that one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import BaseTool, InjectedToolCallId
from langchain_core.tools.base import _is_injected_arg_type, get_all_basemodel_annotations
from langgraph._internal._constants import CONF, CONFIG_KEY_RUNTIME
from langgraph.prebuilt.tool_node import ToolRuntime, _get_all_injected_args
from langgraph.runtime import Runtime

__all__ = ["Injected", "current_writer", "injected_args", "is_runtime", "runtime_with_writer",
           "writer_swapped"]

Writer = Callable[[Any], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Injected:
    """What ``ToolNode`` injects into a tool: parameter -> state field (``None``: the whole
    state), and the parameters taking the store and the runtime; besides, the parameters the
    caller injects (``InjectedToolArg``) and those taking the tool call's id."""

    state: dict[str, str | None]
    store: str | None
    runtime: str | None
    by_caller: frozenset[str] = frozenset()
    call_id: frozenset[str] = frozenset()


def injected_args(tool: BaseTool) -> Injected:
    found = _get_all_injected_args(tool)
    # The parameters annotated as injected (InjectedToolArg and its kinds), as LangChain
    # finds them.
    try:
        annotations = get_all_basemodel_annotations(tool.get_input_schema())
    except Exception:  # a schema LangChain cannot read: no injected parameter known
        annotations = {}
    every = frozenset(name for name, kind in annotations.items() if _is_injected_arg_type(kind))
    call_id = frozenset(name for name, kind in annotations.items()
                        if _is_injected_arg_type(kind, injected_type=InjectedToolCallId))
    named = set(found.state) | {found.store, found.runtime}
    return Injected(dict(found.state), found.store, found.runtime,
                    frozenset(every - named - call_id), call_id)


def is_runtime(value: object) -> bool:
    """A node's ``Runtime`` or a tool's ``ToolRuntime`` (not a mock made with its spec, which
    passes ``isinstance`` but cannot be copied)."""
    return isinstance(value, Runtime | ToolRuntime) and dataclasses.is_dataclass(type(value))


def runtime_with_writer(runtime: Any, writer: Writer) -> Any:
    return dataclasses.replace(runtime, stream_writer=writer)


def _run_runtime(config: Any) -> Any:
    runtime = (config or {}).get(CONF, {}).get(CONFIG_KEY_RUNTIME)
    ok = is_runtime(runtime) and callable(getattr(runtime, "stream_writer", None))
    return runtime if ok else None


def current_writer() -> Writer | None:
    """The stream writer of the run in progress (``get_stream_writer()``), if any."""
    runtime = _run_runtime(var_child_runnable_config.get())
    return None if runtime is None else runtime.stream_writer


@contextmanager
def writer_swapped(make: Callable[[Writer], Writer]) -> Iterator[None]:
    """Within the block, ``get_stream_writer()`` returns ``make(the run's writer)``; outside
    a LangGraph run, nothing changes."""
    config = var_child_runnable_config.get()
    runtime = _run_runtime(config)
    if config is None or runtime is None:
        yield
        return
    swapped = runtime_with_writer(runtime, make(runtime.stream_writer))
    token = var_child_runnable_config.set(
        {**config, CONF: {**config[CONF], CONFIG_KEY_RUNTIME: swapped}})
    try:
        yield
    finally:
        var_child_runnable_config.reset(token)
