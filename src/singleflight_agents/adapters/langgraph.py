"""LangGraph and LangChain: share node runs and tool calls through a :class:`Singleflight`.

Wrapped nodes keep their kind (sync/async) and signature, so LangGraph still injects ``config``,
``store``, ``runtime`` and ``writer``; wrapped tools keep class, name and schemas. Tool calls
are keyed on what the model supplies and on the injected state and runtime the tool declares
(a shared tool that reads the store needs ``key=``), and a shared ToolMessage is re-addressed
to each caller's own tool call id. Custom stream events are stored with the result and written
again for each caller it serves. LangChain messages and documents in results are stored field
by field and rebuilt exactly; other objects JSON cannot carry are shared in flight.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from langchain_core.load.serializable import Serializable
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool
from langchain_core.tools import tool as as_tool
from langgraph.types import Command

from ..engine import Singleflight, default_tool_name
from ..fingerprint import is_async_callable
from ..models import ToolExecutionOptions
from ._langchain_compat import overrides_arun, run_methods, swap_class
from ._langgraph_keys import tool_identity
from ._langgraph_stream import Recorder, replay

__all__ = ["wrap_langchain_tool", "wrap_langchain_tools", "wrap_langgraph_node"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T", bound=BaseTool)
_LC = "__sf_langchain__"
# The id of the tool call being run: BaseTool.run receives it, _run does not.
_CALL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "singleflight_tool_call_id", default=None)


@dataclasses.dataclass(slots=True)
class _Invocation:
    """One call of a node or a tool: what runs, and the tool call it answers."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    call_id: str | None = None
    ran: bool = False  # this caller's own function ran (its stream events went out live)


# The tool whose own run is in progress: a tool whose _arun hands over to _run (say through
# asyncio.to_thread) would otherwise join its own flight and wait for itself.
_RUNNING: contextvars.ContextVar[object] = contextvars.ContextVar("singleflight_running",
                                                                  default=None)


def _running(inv: _Invocation) -> object:
    # A tool's run is partial(base_run, tool): the tool itself; a node is its function.
    func = inv.func
    return func.args[0] if isinstance(func, functools.partial) and func.args else func


# What is stored: (the tool call id it answered, the result, the custom stream events it
# wrote). Receipts of earlier releases hold the first two only.
_Stored = tuple[str | None, Any, list[Any]]


def _call(inv: _Invocation) -> _Stored:
    token = _RUNNING.set(_running(inv))
    inv.ran, recorder = True, Recorder()
    try:
        with recorder.recording(inv.kwargs) as kwargs:
            value = inv.func(*inv.args, **kwargs)
        return inv.call_id, _pack(value), _pack(recorder.events)
    finally:
        _RUNNING.reset(token)


async def _acall(inv: _Invocation) -> _Stored:
    token = _RUNNING.set(_running(inv))
    inv.ran, recorder = True, Recorder()
    try:
        with recorder.recording(inv.kwargs) as kwargs:
            value = await inv.func(*inv.args, **kwargs)
        return inv.call_id, _pack(value), _pack(recorder.events)
    finally:
        _RUNNING.reset(token)


def _finish(inv: _Invocation, result: Any) -> Any:
    owner_call_id, packed, *events = result
    if events and events[0] and not inv.ran:  # served a result: its events, as if it ran
        replay(_unpack(events[0]))
    value = _unpack(packed)
    if owner_call_id and inv.call_id and owner_call_id != inv.call_id:
        value = _retarget(value, owner_call_id, inv.call_id)
    return value


class _Runs:
    """Runs a node's or a tool's calls through the engine, keyed on ``ident(invocation)``."""

    def __init__(self, sf: Singleflight, options: dict[str, Any],
                 default_name: Callable[[bool], str], ident: Callable[[_Invocation], Any]) -> None:
        base = ToolExecutionOptions().replace(**options)
        self.options = base if base.tool_name else base.replace(tool_name=default_name(base.shared))
        self.name: str = self.options.tool_name or ""
        self.sf, self.ident = sf, ident

    def sync(self, inv: _Invocation) -> Any:
        outcome = self.sf.do_sync(self.name, self._identity(inv), functools.partial(_call, inv),
                                  options=self.options)
        return _finish(inv, outcome.value)

    async def run(self, inv: _Invocation) -> Any:
        outcome = await self.sf.do(self.name, self._identity(inv),
                                   functools.partial(_acall, inv), options=self.options)
        return _finish(inv, outcome.value)

    def _identity(self, inv: _Invocation) -> Any:
        # A call run every time is never keyed: what it reads need not be keyable.
        return self.ident(inv) if self.options.shared else None


def wrap_langgraph_node(sf: Singleflight, func: F, *, key: Callable[[Any], Any] | None = None,
                        **options: Any) -> F:
    """A ``StateGraph`` node whose runs go through ``sf``; pass it to ``add_node``.

    Shared with ``deterministic=True`` or ``bounded_read=True``, else run every time; the
    keywords are :class:`ToolExecutionOptions` fields. Calls are keyed on the state, never on
    ``config``, ``store``, ``runtime`` or ``writer``; ``key`` takes the state and returns the
    part that matters. Default ``tool_name``: the function's ``module.qualname``, as for
    every Python function (a closure, method or partial must be named).
    """
    params = list(inspect.signature(func).parameters)  # the first one takes the state

    def ident(inv: _Invocation) -> Any:
        state = inv.args[0] if inv.args else inv.kwargs[params[0]]
        return key(state) if key is not None else state

    runs = _Runs(sf, options, lambda shared: default_tool_name(func, shared), ident)
    wrapper: Any
    if is_async_callable(func):
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await runs.run(_Invocation(func, args, kwargs))
    else:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return runs.sync(_Invocation(func, args, kwargs))
    # LangGraph's injection and schema inference see the node's parameters and annotations
    # through __wrapped__ (an explicit __signature__ would resolve them in this module).
    return cast(F, wrapper)


def wrap_langchain_tool(sf: Singleflight, tool: T | Callable[..., Any], **options: Any) -> T:
    """A copy of ``tool`` (same class, name, description and schemas) whose calls, sync and
    async, go through ``sf``.

    Shared with ``deterministic=True`` or ``bounded_read=True``, else run every time; the
    keywords are :class:`ToolExecutionOptions` fields. Calls are keyed on the model-supplied
    arguments and the injected state fields, whole state or ``ToolRuntime`` (its state and
    context) the tool declares; a shared tool that takes ``InjectedStore`` (or a runtime
    carrying a store) is refused without ``key``. ``key`` takes the model-supplied arguments
    as keywords, and the injected ones its parameters name, and returns what identifies the
    call. Default ``tool_name``: the
    ``module.qualname`` of the function the tool runs, as for every Python function, else
    ``langchain.tool.<tool.name>``. A plain function is made a tool first.
    """
    base_tool: BaseTool = tool if isinstance(tool, BaseTool) else as_tool(tool)
    if getattr(type(base_tool), "__singleflight__", False):
        raise TypeError(f"tool {base_tool.name!r} is wrapped already")
    user_key = options.pop("key", None)
    source = getattr(base_tool, "func", None) or getattr(base_tool, "coroutine", None)
    shared = ToolExecutionOptions().replace(**options).shared
    identity = tool_identity(base_tool, user_key, shared)
    runs = _Runs(sf, options, lambda shared: f"langchain.tool.{base_tool.name}" if source is None
                 else default_tool_name(source, shared),  # a factory's tools must be named
                 lambda inv: identity(inv.args, inv.kwargs))

    wrapped = base_tool.model_copy()  # fields, private state and the schema memo, as they are
    swap_class(wrapped, _routed_class(base_tool, runs))
    return cast(T, wrapped)


def _routed_class(tool: BaseTool, runs: _Runs) -> type[BaseTool]:
    """A subclass of the tool's class whose runs go through ``runs``."""
    cls = type(tool)
    base_run, base_arun = run_methods(cls)
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                 "__doc__": cls.__doc__, "__singleflight__": True}

    @functools.wraps(base_run)
    def _run(self: BaseTool, *args: Any, **kwargs: Any) -> Any:
        if _RUNNING.get() is self:  # called by this tool's own run
            return base_run(self, *args, **kwargs)
        return runs.sync(_Invocation(functools.partial(base_run, self), args, kwargs,
                                     _CALL_ID.get()))

    @functools.wraps(base_arun)
    async def _arun(self: BaseTool, *args: Any, **kwargs: Any) -> Any:
        if _RUNNING.get() is self:
            return await base_arun(self, *args, **kwargs)
        return await runs.run(_Invocation(functools.partial(base_arun, self), args, kwargs,
                                          _CALL_ID.get()))

    def run(self: BaseTool, *args: Any, tool_call_id: str | None = None, **kwargs: Any) -> Any:
        token = _CALL_ID.set(tool_call_id)
        try:
            return cls.run(self, *args, tool_call_id=tool_call_id, **kwargs)
        finally:
            _CALL_ID.reset(token)

    async def arun(self: BaseTool, *args: Any, tool_call_id: str | None = None,
                   **kwargs: Any) -> Any:
        token = _CALL_ID.set(tool_call_id)
        try:
            return await cls.arun(self, *args, tool_call_id=tool_call_id, **kwargs)
        finally:
            _CALL_ID.reset(token)

    namespace.update(_run=_run, run=run, arun=arun)
    # Without a native async path, BaseTool's _arun runs _run (ours) in a thread: wrapping
    # _arun as well would make the call wait for itself.
    if (getattr(tool, "coroutine", None) is not None if "coroutine" in cls.model_fields
            else overrides_arun(base_arun)):
        namespace["_arun"] = _arun
    return type(cls.__name__, (cls,), namespace)


def wrap_langchain_tools(sf: Singleflight, tools: Iterable[BaseTool | Callable[..., Any]],
                         **options: Any) -> list[BaseTool]:
    """:func:`wrap_langchain_tool` for each tool (e.g. for ``ToolNode``); each keeps its own
    default ``tool_name``."""
    if options.get("tool_name"):
        raise TypeError("wrap_langchain_tools: tool_name= would give every tool the same "
                        "name; wrap tools one by one to name them")
    return [wrap_langchain_tool(sf, tool, **options) for tool in tools]


# -- results: LangChain objects stored field by field, tool call ids re-addressed ---------


def _pack(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _pack(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return kind(_pack(v) for v in value)
    if (isinstance(value, Serializable) and kind.__module__.startswith("langchain_core.")
            and "." not in kind.__qualname__):
        return {_LC: f"{kind.__module__}:{kind.__qualname__}",
                "v": {name: _pack(getattr(value, name)) for name in kind.model_fields},
                "set": sorted(value.model_fields_set)}
    return value


def _unpack(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        if _LC in value and len(value) == 3:
            module, _, name = value[_LC].partition(":")
            cls = getattr(importlib.import_module(module), name, None) \
                if module.startswith("langchain_core.") else None
            if not (isinstance(cls, type) and issubclass(cls, Serializable)):
                raise TypeError(f"a stored result names {value[_LC]!r}, not a LangChain class")
            return cls.model_construct(_fields_set=set(value["set"]), **_unpack(value["v"]))
        return {k: _unpack(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return kind(_unpack(v) for v in value)
    return value


def _retarget(value: Any, old: str, new: str) -> Any:
    """``value`` with tool messages answering call ``old`` answering ``new`` instead."""
    if isinstance(value, ToolMessage) and value.tool_call_id == old:
        return value.model_copy(update={"tool_call_id": new})
    if isinstance(value, Command):
        return dataclasses.replace(value, update=_retarget(value.update, old, new))
    kind = type(value)
    if kind is dict:
        return {k: _retarget(v, old, new) for k, v in value.items()}
    if kind is list or kind is tuple:
        return kind(_retarget(v, old, new) for v in value)
    return value
