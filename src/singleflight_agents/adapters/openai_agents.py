"""OpenAI Agents SDK adapter: function tools whose identical calls execute once.

``function_tool(sf, func, **options)`` is ``agents.function_tool`` with the Python function
routed through the engine: the SDK builds the tool from the function itself (its name,
description and parameter schema are exactly the SDK's) and keeps its whole pipeline
(argument validation, approvals, failure handling, timeouts, output checks). A first
``RunContextWrapper`` / ``ToolContext`` parameter reaches the function but never the
fingerprint. ``tool.__wrapped__`` is the function itself, as with the SDK. ``wrap_function_tool(sf,
tool, **options)`` deduplicates a ``FunctionTool`` built elsewhere, keyed on its name and its
JSON arguments in canonical form.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any, overload

from agents import AgentBase, FunctionTool, RunContextWrapper
from agents import function_tool as sdk_function_tool
from agents.function_schema import DocstringStyle
from agents.tool import (
    FunctionToolCustomDataExtractor,
    ToolCaller,
    ToolErrorFunction,
    ToolTimeoutBehavior,
)
from agents.tool_context import ToolContext
from agents.tool_guardrails import ToolInputGuardrail, ToolOutputGuardrail
from agents.util._types import MaybeAwaitable

from ..engine import Singleflight, default_tool_name
from ..models import OPTION_ALIASES, RUN_SETTINGS, ToolExecutionOptions
from ._agents_compat import (
    UNSET_FAILURE_ERROR_FUNCTION,
    copy_invoker_marks,
    expose_wrapped,
    handles_failures,
    raise_failures,
    with_failure_handler,
)
from ._context import context_free_key

__all__ = ["function_tool", "wrap_function_tool"]

SDK_KEYWORDS = frozenset(inspect.signature(sdk_function_tool).parameters) - {"func"}
# Fields, their aliases, and the run's settings (which ToolExecutionOptions then refuses by name).
ENGINE_KEYWORDS = frozenset(f.name for f in dataclasses.fields(ToolExecutionOptions)) \
    | OPTION_ALIASES.keys() | RUN_SETTINGS

ToolFunction = Callable[..., Any]
Invoker = Callable[[ToolContext[Any], str], Awaitable[Any]]


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (keywords of ``agents.function_tool``, ``ToolExecutionOptions`` fields)."""
    unknown = sorted(set(options) - SDK_KEYWORDS - ENGINE_KEYWORDS)
    if unknown:
        raise TypeError(
            f"function_tool() got unknown keyword(s) {', '.join(unknown)}; it takes the keywords "
            f"of agents.function_tool ({', '.join(sorted(SDK_KEYWORDS))}) and the fields of "
            f"ToolExecutionOptions ({', '.join(sorted(ENGINE_KEYWORDS))})")
    sdk = {k: v for k, v in options.items() if k in SDK_KEYWORDS}
    engine = {k: v for k, v in options.items() if k in ENGINE_KEYWORDS}
    return sdk, engine


def _context_free_key(func: ToolFunction, user_key: Callable[..., Any] | None) -> Callable[..., Any]:
    """The ``key=`` for ``func``: its arguments without a leading run context."""
    return context_free_key(func, user_key, lambda arg: isinstance(arg, RunContextWrapper))


@overload
def function_tool(sf: Singleflight, /, func: ToolFunction, **options: Any) -> FunctionTool: ...


@overload
def function_tool(
    sf: Singleflight, /, func: None = None, **options: Any
) -> Callable[[ToolFunction], FunctionTool]: ...


def function_tool(
    sf: Singleflight, /, func: ToolFunction | None = None, *,
    name_override: str | None = None,
    description_override: str | None = None,
    docstring_style: DocstringStyle | None = None,
    use_docstring_info: bool = True,
    failure_error_function: ToolErrorFunction | object | None = UNSET_FAILURE_ERROR_FUNCTION,
    strict_mode: bool = True,
    is_enabled: bool | Callable[[RunContextWrapper[Any], AgentBase[Any]], MaybeAwaitable[bool]] = True,
    needs_approval: bool | Callable[[RunContextWrapper[Any], dict[str, Any], str], Awaitable[bool]] = False,
    tool_input_guardrails: list[ToolInputGuardrail[Any]] | None = None,
    tool_output_guardrails: list[ToolOutputGuardrail[Any]] | None = None,
    timeout: float | None = None,
    timeout_behavior: ToolTimeoutBehavior = "error_as_result",
    timeout_error_function: ToolErrorFunction | None = None,
    defer_loading: bool = False,
    custom_data_extractor: FunctionToolCustomDataExtractor | None = None,
    allowed_callers: list[ToolCaller] | None = None,
    output_type: Any | None = None,
    output_json_schema: dict[str, Any] | None = None,
    **options: Any,
) -> FunctionTool | Callable[[ToolFunction], FunctionTool]:
    """``agents.function_tool`` whose calls go through ``sf``; sync or async functions.

    ``@function_tool(sf, deterministic=True, ttl_seconds=300)`` or ``function_tool(sf, func,
    ...)``. The keywords of ``agents.function_tool``, keyword-only as there (and any a newer
    SDK adds), and the fields of :class:`ToolExecutionOptions`; any other raises
    ``TypeError``. The engine's ``tool_name`` defaults to the function's ``module.qualname``.
    A ``key=`` receives the tool's arguments without the run context. As everywhere, calls
    are shared only with ``deterministic=True`` or ``bounded_read=True``. ``tool.__wrapped__``
    is ``func`` itself, as with the SDK: calling it runs the function, not the engine.

    A callable object (not a function or method) becomes the SDK's own tool wrapped by
    :func:`wrap_function_tool`: keyed on its JSON arguments, ``key=`` receiving them as keywords.
    """
    given = {k: v for k, v in locals().items() if k in _DECLARED and v is not _DECLARED[k]}
    sdk, engine = _split({**given, **options})
    base = ToolExecutionOptions().replace(**engine)  # bad values fail here, not at first call

    def build(f: ToolFunction) -> FunctionTool:
        if not callable(f):
            raise TypeError(f"function_tool() expected a function, got {type(f).__name__}")
        if not (inspect.isfunction(f) or inspect.ismethod(f)):
            return wrap_function_tool(sf, sdk_function_tool(f, **sdk), **engine)
        # The engine's rule for a Python function (module.qualname, whatever the SDK calls the
        # tool); a closure, lambda or bound method must be named: its name cannot tell apart
        # what it holds.
        name = base.tool_name or default_tool_name(f, base.shared)
        # sf.tool keeps the function's name, docstring, signature and sync/async nature
        # (functools.wraps), so the SDK derives the very schema it would from ``f``.
        routed = sf.tool(_boxing(f), **{**engine, "tool_name": name,
                                        "key": _context_free_key(f, base.key)})
        tool = sdk_function_tool(_unboxing(routed), **sdk)
        expose_wrapped(tool, f)  # the user's function, as the SDK gives it: not the engine's
        return tool

    if func is None:
        return build
    return build(func)


class _Unawaited:
    """An awaitable a sync tool returned, handed back as it is (the SDK passes it on to its
    caller unawaited) instead of being run by the engine, which runs a coroutine a sync call
    returns. Itself awaitable, so the engine never stores nor shares it: each caller runs."""

    __slots__ = ("value",)

    def __init__(self, value: Awaitable[Any]) -> None:
        self.value = value

    def __await__(self) -> Any:
        return self.value.__await__()


def _boxing(f: ToolFunction) -> ToolFunction:
    if inspect.iscoroutinefunction(f):
        return f

    @functools.wraps(f)
    def boxed(*args: Any, **kwargs: Any) -> Any:
        value = f(*args, **kwargs)
        return _Unawaited(value) if inspect.isawaitable(value) else value

    return boxed


def _unboxing(routed: ToolFunction) -> ToolFunction:
    if inspect.iscoroutinefunction(routed):
        return routed

    @functools.wraps(routed)
    def unboxed(*args: Any, **kwargs: Any) -> Any:
        value = routed(*args, **kwargs)
        return value.value if isinstance(value, _Unawaited) else value

    return unboxed


# The keywords function_tool declares, with their defaults: only those given are passed on,
# so the SDK's own defaults apply to the rest.
_DECLARED = {name: p.default for name, p in inspect.signature(function_tool).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}


def wrap_function_tool(sf: Singleflight, tool: FunctionTool, /, **options: Any) -> FunctionTool:
    """A copy of ``tool`` whose identical calls execute once through ``sf``.

    Calls are keyed on the engine's ``tool_name`` (default: ``openai.tool.<tool.name>``, the
    rule for a framework tool with no Python function of ours) and the JSON
    arguments, parsed, so key order and whitespace do not matter; the ``ToolContext`` is not
    keyed. ``options`` are :class:`ToolExecutionOptions` fields (``key=`` receives the parsed
    arguments as keywords). The SDK's failure handling (its message for the model, the
    function span's error, its log lines), approvals and ``__wrapped__`` keep working; an
    error message made for the model is returned, never stored.
    """
    if not isinstance(tool, FunctionTool):
        raise TypeError(f"wrap_function_tool() expected an agents.FunctionTool, got "
                        f"{type(tool).__name__}")
    base = ToolExecutionOptions().replace(**options)  # TypeError naming unknown options
    user_key = base.key
    name = base.tool_name or f"openai.tool.{tool.name}"
    opts = base.replace(tool_name=name, key=None)
    original = tool.on_invoke_tool
    sdk_failures = handles_failures(original)
    raw = copy.copy(tool)  # the SDK's invoker, rebound to this copy
    if sdk_failures:
        raise_failures(raw)  # errors raise: nothing to store

    properties = tool.params_json_schema.get("properties", {})
    defaults = {k: p["default"] for k, p in properties.items()
                if isinstance(p, dict) and "default" in p}

    async def invoke(ctx: ToolContext[Any], arguments: str) -> Any:
        parsed = _parse(arguments)
        if parsed is None:  # not a JSON object: the tool reports it; nothing to share
            return await raw.on_invoke_tool(ctx, arguments)
        parsed = {**defaults, **parsed}  # an omitted default is the same call
        identity = user_key(**parsed) if user_key is not None else parsed
        outcome = await sf.do(name, identity, functools.partial(raw.on_invoke_tool, ctx, arguments),
                              options=opts)
        return outcome.value

    invoker: Invoker = invoke
    if sdk_failures:
        copy_invoker_marks(original, invoke, tool)
        # The SDK's own failure handling around ours: the model's error message, the span's
        # error and the log lines, as the tool has them unwrapped.
        invoker = with_failure_handler(original, invoke)
    wrapped = copy.copy(tool)
    wrapped.on_invoke_tool = invoker
    return copy.copy(wrapped)  # copying binds the SDK's invoker to the tool it belongs to


def _parse(arguments: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None

