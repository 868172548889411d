"""The key of a tool call whose framework passes a run context first (the Agents SDK's
``RunContextWrapper``, PydanticAI's ``RunContext``): the context is never keyed."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..fingerprint import bind_arguments


def context_free_key(func: Callable[..., Any], user_key: Callable[..., Any] | None,
                     is_context: Callable[[Any], bool],
                     keyed_with_context: bool = False) -> Callable[..., Any]:
    """The ``key=`` for ``func``: its arguments bound by name, without a context passed first
    (``is_context``); or ``user_key``'s answer for the same arguments, given the context too
    only if ``keyed_with_context``."""
    first = next(iter(inspect.signature(func).parameters), None)

    def key(*args: Any, **kwargs: Any) -> Any:
        has_context = bool(args) and is_context(args[0])
        if user_key is not None:
            if keyed_with_context or not has_context:
                return user_key(*args, **kwargs)
            return user_key(*args[1:], **kwargs)
        bound = bind_arguments(func, args, kwargs)
        if has_context and first is not None:
            bound.pop(first, None)
        return bound

    return key
