"""One call through the engine, and what it came to."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .models import Receipt, Source, ToolExecutionOptions, check_text

if TYPE_CHECKING:
    import asyncio

    from .sessions import Session


# Plain classes, not dataclasses: each dataclass costs milliseconds at import.

class Call:
    __slots__ = ("duplicate", "flight_key", "fn", "inputs", "is_async", "key", "loop", "mode",
                 "options", "session", "shown_inputs", "tampered", "tool_name")

    def __init__(self, fn: Callable[[], Any], options: ToolExecutionOptions, tool_name: str,
                 is_async: bool, session: Session | None, mode: str) -> None:
        self.fn, self.options, self.tool_name, self.is_async = fn, options, tool_name, is_async
        self.session, self.mode = session, mode  # the run's, as they were when the call began
        # The loop an async entry runs on; None for a sync entry (which may block its thread).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.key = self.inputs = ""  # set for shared calls only
        # (store identity, key): the call's flight, once its store is open; None if unshared.
        self.flight_key: tuple[str, str] | None = None
        self.shown_inputs = ""  # what receipts and messages show: inputs, minus redactions
        self.tampered = False  # counted once per call, however often the receipt was read
        self.duplicate = False  # mode="off": an earlier call had the same key


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
