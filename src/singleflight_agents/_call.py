"""One call through the engine, and what it came to."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .fingerprint import (
    binder,
    encode_inputs,
    fingerprint_of,
    remember_key,
    remembered_key,
    shown_identity,
    shown_inputs,
)
from .models import Receipt, Source, ToolExecutionOptions, check_text
from .sessions import active_session

if TYPE_CHECKING:
    import asyncio



# Plain classes, not dataclasses: each dataclass costs milliseconds at import.

class Call:
    __slots__ = ("args", "began", "duplicate", "flight_key", "func", "inline_io", "inputs",
                 "is_async", "key", "kwargs", "loop", "mode", "options", "session", "shown_inputs",
                 "tampered", "tool_name")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 options: ToolExecutionOptions, tool_name: str, is_async: bool,
                 engine_mode: str) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs
        self.options, self.tool_name, self.is_async = options, tool_name, is_async
        # The run's session and mode as they were when the call began (else the engine's mode).
        self.session = session = active_session()
        self.mode = engine_mode if session is None else session.mode_now()
        self.began = time.time()
        # The loop an async entry runs on; None for a sync entry (which may block its thread).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.key = self.inputs = ""  # set for shared calls only
        # (store identity, key): the call's flight, once its store is open; None if unshared.
        self.flight_key: tuple[str, str] | None = None
        # Whether its store's operations run on an async caller's loop (a local file), or in
        # store threads (a server): see _drive.Io.
        self.inline_io = False
        self.shown_inputs = ""  # what receipts and messages show: inputs, minus redactions
        self.tampered = False  # counted once per call, however often the receipt was read
        self.duplicate = False  # mode="off": an earlier call had the same key

    def invoke(self) -> Any:
        """Run the tool (a coroutine, for an async one)."""
        return self.func(*self.args, **self.kwargs)


class Result:
    __slots__ = ("encoded", "latency_ms", "receipt", "source", "takeover", "value")

    def __init__(self, value: Any, source: Source, receipt: Receipt | None = None,
                 encoded: tuple[str, str] | None = None, latency_ms: float = 0.0,
                 takeover: bool = False) -> None:
        self.value, self.source, self.receipt = value, source, receipt
        self.encoded = encoded  # lets each waiter decode its own copy
        self.latency_ms, self.takeover = latency_ms, takeover


def default_tool_name(func: Callable[..., Any], shared: bool) -> str:
    """``module.qualname``; for a shared lambda, closure, bound method or callable object,
    a ``TypeError`` asking for ``tool_name=``."""
    qualname = getattr(func, "__qualname__", None)
    name = f"{getattr(func, '__module__', None) or 'tool'}.{qualname or type(func).__qualname__}"
    if shared and (qualname is None or "<lambda>" in qualname or inspect.ismethod(func)
                   or getattr(func, "__closure__", None)):
        # The name does not tell apart what it captured: make_search("docs") and
        # make_search("tickets"), or Index("a").search and Index("b").search, would share.
        raise TypeError(f"{name} is a lambda, closure, bound method or callable object: pass "
                        f"tool_name= so that calls of different tools cannot share results")
    return check_text(name, "the tool name made of the function's module and name",
                      "pass tool_name= with plain text")


def call_of_function(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                     options: ToolExecutionOptions | None, mode: str) -> Call:
    """``func(*args, **kwargs)`` as a call, keyed on its bound arguments (or ``key=``'s)."""
    if options is None:
        options = getattr(func, "singleflight_options", None) or ToolExecutionOptions()
    func = getattr(func, "__wrapped__", func) if hasattr(func, "singleflight_options") else func
    if not callable(func):
        raise TypeError(f"expected a callable tool, got {type(func).__name__}")
    bind = binder(func)
    call = Call(func, args, kwargs, options,
                options.tool_name or default_tool_name(func, options.shared), bind.is_async, mode)
    if options.shared and options.key is None and options.redact is None:
        head = (call.tool_name, options.namespace, options.scope, options.version)
        memo, keyed = remembered_key(bind, head, args, kwargs)
        if keyed is None:
            _key(call, bind.bind(args, kwargs), None)
            if memo is not None:
                remember_key(bind, memo, (call.inputs, call.key))
        else:
            call.inputs = call.shown_inputs = keyed[0]
            call.key = keyed[1]
    elif options.shared:
        ident = options.key(*args, **kwargs) if options.key else bind.bind(args, kwargs)
        shown = None
        if options.redact is not None:
            shown = shown_inputs(call.tool_name, func, options.redact, ident, args, kwargs,
                                 keyed=options.key is not None)
        _key(call, ident, shown)
    return call


def call_of_identity(tool_name: str, identity: Any, fn: Callable[[], Any],
                     options: ToolExecutionOptions | None, is_async: bool, mode: str) -> Call:
    """``fn()`` as a call of ``tool_name``, keyed on ``identity`` (``Singleflight.do``)."""
    options = options or ToolExecutionOptions()
    if not callable(fn):
        raise TypeError(f"do() expected a function to run, got {type(fn).__name__}")
    if not isinstance(tool_name, str) or not tool_name.strip():
        raise ValueError(f"do() needs a tool name, the name its receipts and statistics go "
                         f"under; got {tool_name!r}")
    call = Call(fn, (), {}, options, check_text(tool_name, "do() tool name"), is_async, mode)
    if options.shared:
        redact = options.redact
        shown = None if redact is None else shown_identity(call.tool_name, redact, identity)
        _key(call, identity, shown)
    return call


def _key(call: Call, identity: Any, shown: str | None) -> None:
    options = call.options
    call.inputs = encode_inputs(call.tool_name, identity)
    call.shown_inputs = call.inputs if shown is None else shown
    call.key = fingerprint_of(call.tool_name, call.inputs, namespace=options.namespace,
                              scope=options.scope, version=options.version)
