"""PydanticAI adapter: tools whose identical calls execute once.

``pydantic_ai_tool(sf, **options)`` is a decorator that goes under PydanticAI's own
(``@agent.tool``, ``@agent.tool_plain``, ``@toolset.tool``) or around a function given to
``Tool(...)`` / ``FunctionToolset([...])``: PydanticAI still builds the tool from the function
itself, so its name, description and JSON schema are exactly PydanticAI's, and the
``RunContext`` it passes first reaches the function but never the fingerprint.
``wrap_pydantic_ai_toolset(sf, toolset, **options)`` deduplicates a toolset built elsewhere (a
``FunctionToolset`` of library ``Tool`` objects, an MCP server), keyed on each tool's name and
its validated arguments.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

try:
    from pydantic_ai import RunContext
    from pydantic_ai.toolsets import AbstractToolset, ToolsetTool, WrapperToolset
except ImportError as exc:  # the adapter's framework is an extra
    raise ImportError(f"singleflight_agents.adapters.pydantic_ai needs PydanticAI ({exc.name}): "
                      f"pip install 'singleflight-agents[pydantic-ai]'", name=exc.name) from exc

from ..engine import Singleflight
from ..models import ToolExecutionOptions
from ._context import context_free_key

__all__ = ["SingleflightToolset", "pydantic_ai_tool", "wrap_pydantic_ai_toolset"]

F = TypeVar("F", bound=Callable[..., Any])
TOOL_PREFIX = "pydantic_ai.tool."  # the engine's name of a toolset's tool: TOOL_PREFIX + its name


def _takes_context(func: Callable[..., Any]) -> bool:
    """Whether ``func``'s first parameter is annotated ``RunContext`` (parameterized or not): the
    rule by which PydanticAI itself tells whether a ``Tool`` function takes the context."""
    try:
        first = next(iter(inspect.signature(func).parameters.values()), None)
    except (TypeError, ValueError):
        return False
    if first is None or first.kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                           inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return False
    annotation = first.annotation
    if isinstance(annotation, str):  # postponed annotations
        try:
            annotation = typing.get_type_hints(func).get(first.name)
        except Exception:
            return False
    return annotation is RunContext or typing.get_origin(annotation) is RunContext


def _context_free_key(func: Callable[..., Any], user_key: Callable[..., Any] | None) -> Callable[..., Any]:
    """The ``key=`` for ``func``: its arguments bound by name, without the ``RunContext`` PydanticAI
    passes first to a tool that takes one; or ``user_key``'s answer, given the same arguments
    without the context, unless its own first parameter is annotated ``RunContext``."""
    key_takes_context = user_key is not None and _takes_context(user_key)
    key = context_free_key(func, user_key, lambda arg: isinstance(arg, RunContext),
                           keyed_with_context=key_takes_context)
    if user_key is None or not key_takes_context:
        return key
    named = _name(user_key)

    def key_needing_context(*args: Any, **kwargs: Any) -> Any:
        # PydanticAI passes the context positionally, first, and only to a tool declared to take
        # it (`@agent.tool`, or `Tool` inferring it from the annotation); a tool_plain never gets one.
        if not (args and isinstance(args[0], RunContext)):
            raise TypeError(f"key= {named} takes a RunContext, but the tool was "
                            f"called without one (a tool_plain, or a direct call)")
        return key(*args, **kwargs)

    return key_needing_context


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or type(func).__qualname__


@overload
def pydantic_ai_tool(sf: Singleflight, func: F, /, **options: Any) -> F: ...


@overload
def pydantic_ai_tool(sf: Singleflight, func: None = None, /, **options: Any) -> Callable[[F], F]: ...


def pydantic_ai_tool(sf: Singleflight, func: F | None = None, /, **options: Any) -> F | Callable[[F], F]:
    """A PydanticAI tool function whose calls go through ``sf``; sync stays sync.

    Place it under PydanticAI's decorator::

        @agent.tool
        @pydantic_ai_tool(sf, bounded_read=True, ttl_seconds=600)
        async def search(ctx: RunContext[Deps], query: str, limit: int = 5) -> list[str]: ...

    or wrap a function for ``Tool(...)``, ``FunctionToolset([...])`` or ``Agent(tools=[...])``.
    The result keeps the function's name, docstring, signature and annotations
    (``functools.wraps``), so PydanticAI derives the same tool name, description and parameter
    schema as from the function itself. Keywords are the fields of :class:`ToolExecutionOptions`
    (others raise ``TypeError``); PydanticAI's own (``name=``, ``retries=``, ``prepare=``, ...)
    go to its decorator. Keyed on the function's arguments bound by name, defaults applied; a
    ``RunContext`` passed first is never keyed, and ``key=`` receives the arguments without it,
    unless the key's own first parameter is annotated ``RunContext`` (PydanticAI's rule for
    tools): then it gets the context too, to key on what the answer depends on in
    ``ctx.deps`` (the user, the tenant). The engine's ``tool_name`` defaults to the function's
    ``module.qualname``; a closure, lambda or bound method must be named. As everywhere, calls
    are shared only with ``deterministic=True`` or ``bounded_read=True``.
    """
    base = ToolExecutionOptions().replace(**options)  # bad values fail here, not at first call

    def build(f: F) -> F:
        if not callable(f):
            raise TypeError(f"pydantic_ai_tool() expected a function, got {type(f).__name__}")
        routed: F = sf.tool(f, **{**options, "key": _context_free_key(f, base.key)})
        return routed

    if func is None:
        return build
    return build(func)


@dataclass
class SingleflightToolset(WrapperToolset[Any]):
    """A PydanticAI toolset whose tool calls go through ``engine`` (see
    :func:`wrap_pydantic_ai_toolset`). The wrapped toolset lists the tools and runs them."""

    engine: Singleflight
    options: ToolExecutionOptions
    identity: Callable[[dict[str, Any], RunContext[Any], ToolsetTool[Any]], Any]

    async def call_tool(self, name: str, tool_args: dict[str, Any], ctx: RunContext[Any],
                        tool: ToolsetTool[Any]) -> Any:
        run = functools.partial(self.wrapped.call_tool, name, tool_args, ctx, tool)
        outcome = await self.engine.do(TOOL_PREFIX + name, self.identity(tool_args, ctx, tool),
                                       run, options=self.options)
        return outcome.value


def wrap_pydantic_ai_toolset(sf: Singleflight, toolset: AbstractToolset[Any], /,
                             **options: Any) -> SingleflightToolset:
    """``toolset`` (any PydanticAI toolset) with identical tool calls executed once through ``sf``.

    For tools built elsewhere: ``wrap_pydantic_ai_toolset(sf, FunctionToolset([library_tool]),
    bounded_read=True)``, an MCP server, or any toolset, passed to ``Agent(toolsets=[...])``. The
    toolset still lists its tools (names, descriptions, schemas unchanged) and validates their
    arguments. Each call is keyed on the engine's ``tool_name`` ``pydantic_ai.tool.<name>`` (the
    tool's name as this toolset lists it) and its validated arguments, with the schema's defaults
    filled in for arguments the model left out; the ``RunContext`` is never keyed. ``options``
    are :class:`ToolExecutionOptions` fields and apply to every tool of the toolset (wrap a
    ``.filtered(...)`` part, or separate toolsets, to flag reads and writes apart); ``key=``
    receives a call's arguments as keywords (preceded by the ``RunContext`` when its first
    parameter is annotated so), ``redact=`` paths name arguments. ``tool_name=`` is refused:
    each tool keeps its own name; ``namespace=`` keeps two toolsets' receipts apart.
    """
    if not isinstance(toolset, AbstractToolset):
        raise TypeError(f"wrap_pydantic_ai_toolset() expected a pydantic_ai toolset "
                        f"(AbstractToolset), got {type(toolset).__name__}")
    if "tool_name" in options:
        raise TypeError("wrap_pydantic_ai_toolset() takes no tool_name=: each tool of the toolset "
                        f"is keyed under its own name ({TOOL_PREFIX}<name>); pass namespace= to "
                        "keep two toolsets' receipts apart")
    base = ToolExecutionOptions().replace(**options)  # TypeError naming unknown options
    user_key = base.key
    key_takes_context = user_key is not None and _takes_context(user_key)

    def identity(arguments: dict[str, Any], ctx: RunContext[Any], tool: ToolsetTool[Any]) -> Any:
        arguments = _with_defaults(tool, arguments)
        if user_key is None:
            return arguments
        return user_key(ctx, **arguments) if key_takes_context else user_key(**arguments)

    return SingleflightToolset(toolset, sf, base.replace(key=None), identity)


def _with_defaults(tool: ToolsetTool[Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` with the schema's defaults for the ones left out, so that omitting an
    argument and passing its default are one call. Only when every argument is a property of
    the schema (a single model-like parameter is passed as ``{name: model}`` instead)."""
    properties = tool.tool_def.parameters_json_schema.get("properties")
    if not isinstance(properties, dict) or not arguments.keys() <= properties.keys():
        return arguments
    defaults = {name: schema["default"] for name, schema in properties.items()
                if name not in arguments and isinstance(schema, dict) and "default" in schema}
    return {**defaults, **arguments} if defaults else arguments
