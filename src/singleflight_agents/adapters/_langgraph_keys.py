"""What identifies a LangChain tool's call: the arguments the model supplies, and the values
``ToolNode`` injects that the tool declares it reads.

An injected state field (``InjectedState("field")``) or the whole state (``InjectedState``)
is keyed by value, messages without their ``id`` (LangGraph gives each message a new one
every run); a ``ToolRuntime`` by its state and context. The store cannot be keyed (its
contents are not an argument): a shared tool that takes it, or a runtime that carries one,
needs ``key=``. The tool call id (answers are re-addressed), config, callbacks and the stream
writer are never keyed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.messages import BaseMessage, message_to_dict
from langchain_core.tools import BaseTool
from langchain_core.utils.pydantic import get_fields
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ..codec import canonical_json
from ._langgraph_compat import Injected, injected_args, is_runtime

__all__ = ["tool_identity"]

Identity = Callable[[tuple[Any, ...], dict[str, Any]], Any]


def tool_identity(tool: BaseTool, user_key: Callable[..., Any] | None, shared: bool) -> Identity:
    """``ident(args, kwargs)`` of a call of ``tool``'s own run method: the model's arguments
    (defaults applied) and the injected values the tool reads, or ``user_key``'s answer for
    the model's arguments and the injected ones its parameters name."""
    names, defaults = _model_arguments(tool)
    injected = injected_args(tool)
    if shared and user_key is None and injected.store:
        raise TypeError(_refusal(tool.name, f"the store ({injected.store!r})"))
    for_key = _named_by(user_key, injected) if user_key is not None else ()
    # How a call runs, not what it answers: never keyed (the store is refused above).
    not_keyed = {*_RUN_ARGUMENTS, *injected.call_id, *injected.state,
                 *(name for name in (injected.store, injected.runtime) if name is not None)}

    def ident(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        given = {"*": args} if len(args) > len(names) else dict(zip(names, args, strict=False))
        supplied = {k: v for k, v in {**defaults, **kwargs}.items() if k in names} | given
        if user_key is not None:
            return user_key(**supplied, **{k: kwargs[k] for k in for_key if k in kwargs})
        extra = _injected_values(tool.name, injected, kwargs)
        # Whatever else reaches the tool decides its answer too: a value the caller injects
        # (InjectedToolArg), an argument a dict schema does not list (LangChain passes it on).
        unlisted = {k: keyed(v) for k, v in kwargs.items()
                    if k not in supplied and k not in extra and k not in not_keyed}
        _check_encodable(tool.name, unlisted)
        extra |= unlisted
        return supplied | extra if extra else supplied

    return ident


def _model_arguments(tool: BaseTool) -> tuple[list[str], dict[str, Any]]:
    """The names in the tool-call schema (what the model supplies) and their defaults."""
    schema = tool.tool_call_schema
    if isinstance(schema, dict):
        props = schema.get("properties", {})
        defaults = {k: p["default"] for k, p in props.items() if "default" in p}
    else:
        props = get_fields(schema)
        defaults = {k: f.default for k, f in props.items() if isinstance(f, FieldInfo)
                    and f.default_factory is None and not f.is_required()}
    return [name for name in props if name not in _RUN_ARGUMENTS], defaults


_RUN_ARGUMENTS = frozenset({"config", "run_manager", "callbacks"})


def _named_by(user_key: Callable[..., Any], injected: Injected) -> tuple[str, ...]:
    """The injected parameters ``key=`` asks for by name (never through ``**kwargs``: a
    store it did not ask for would be handed to it)."""
    try:
        params = inspect.signature(user_key).parameters
    except (TypeError, ValueError):
        return ()
    names = [*injected.state, injected.store, injected.runtime, *injected.by_caller, "config"]
    return tuple(name for name in names if name is not None and name in params
                 and params[name].kind is not inspect.Parameter.VAR_KEYWORD)


def _injected_values(tool_name: str, injected: Injected, kwargs: dict[str, Any]) -> dict[str, Any]:
    values = {name: keyed(kwargs[name]) for name in injected.state if name in kwargs}
    runtime = kwargs.get(injected.runtime) if injected.runtime else None
    if runtime is not None and injected.runtime is not None:
        if getattr(runtime, "store", None) is not None:
            raise TypeError(_refusal(tool_name, f"a runtime ({injected.runtime!r}) that carries "
                                                f"the store"))
        # The parts of a runtime a tool reads for its answer; its config, tool call id,
        # stream writer and tool list are how the call runs, not what it answers.
        values[injected.runtime] = {"state": keyed(getattr(runtime, "state", None)),
                                    "context": keyed(getattr(runtime, "context", None))} \
            if is_runtime(runtime) else keyed(runtime)
    _check_encodable(tool_name, values)
    return values


def _check_encodable(tool_name: str, values: dict[str, Any]) -> None:
    for name, value in values.items():
        try:
            canonical_json(value)
        except TypeError as exc:
            raise TypeError(_refusal(tool_name, f"{name!r}, which holds {exc}")) from None


def _refusal(tool_name: str, what: str) -> str:
    return (f"tool {tool_name!r} is shared but reads {what}, which cannot be keyed: pass key= "
            f"(a function of the model's arguments, and of the injected ones it names) to say "
            f"what identifies its calls")


def keyed(value: Any) -> Any:
    """An injected value as the key sees it: messages without their ``id``, pydantic models
    and dataclasses field by field, other values as they are (for the engine's encoder)."""
    if isinstance(value, BaseMessage):
        entry = message_to_dict(value)
        return {**entry, "data": {k: v for k, v in entry["data"].items() if k != "id"}}
    if isinstance(value, BaseModel):  # extra fields (extra="allow") included
        fields = {name: getattr(value, name) for name in type(value).model_fields}
        return {name: keyed(v) for name, v in {**fields, **(value.model_extra or {})}.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: keyed(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: keyed(v) for k, v in value.items()}
        # Keys of other types stay apart from their text ({1: x} is not {"1": x}).
        return ["<mapping>", [[keyed(k), keyed(v)] for k, v in value.items()]]
    if isinstance(value, list | tuple):
        return [keyed(v) for v in value]
    legacy = getattr(value, "dict", None)  # a pydantic.v1 model
    if hasattr(type(value), "__fields__") and callable(legacy):
        return keyed(legacy())
    return value
