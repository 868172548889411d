"""Fingerprints: one key per (tool, arguments), whatever form the call took.

Arguments are bound to the function's signature with defaults applied, so ``f("a")``,
``f(x="a")`` and ``f()`` with default ``"a"`` are one call. They are then encoded
canonically (see :mod:`.codec`): ``1``, ``1.0``, ``True`` and ``"1"`` differ, tuples
differ from lists, dict and set order does not matter. Nothing is ever ``repr()``-ed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .codec import UnencodableError, canonical_json

FORMAT = "sf1"


class _Binder:
    """Binds a call's arguments to parameter names; plain positional calls skip inspect."""

    def __init__(self, func: Callable[..., Any]) -> None:
        try:
            self.signature: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):
            self.signature = None
        params = list(self.signature.parameters.values()) if self.signature else []
        simple = self.signature is not None and all(
            p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        self.names = tuple(p.name for p in params) if simple else None
        self.is_async = inspect.iscoroutinefunction(func)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self.names is not None and not kwargs and len(args) == len(self.names):
            return dict(zip(self.names, args, strict=True))
        if self.signature is None:
            return {"args": args, "kwargs": dict(kwargs)}
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments


def binder(func: Callable[..., Any]) -> _Binder:
    """The (cached) binder of ``func``."""
    try:
        return _cached_binder(func)
    except TypeError:  # an unhashable callable object
        return _Binder(func)


@functools.lru_cache(maxsize=4096)
def _cached_binder(func: Callable[..., Any]) -> _Binder:
    return _Binder(func)


def bind_arguments(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults applied."""
    return binder(func).bind(args, kwargs)


def encode_inputs(tool_name: str, arguments: Any) -> str:
    """Canonical JSON of ``arguments``; a ``TypeError`` names the argument that has none."""
    try:
        return canonical_json(arguments)
    except UnencodableError as exc:
        # "['payload']['items'][2]" reads better as "payload['items'][2]".
        where = re.sub(r"^\[(['\"])(.*?)\1\]", r"\2", exc.where(""), count=1)
        raise TypeError(
            f"{tool_name}: argument {where or 'value'!r} of type {exc.type_name} cannot be "
            f"fingerprinted; pass key= to the tool to choose what identifies the call"
        ) from None


def fingerprint_of(
    tool_name: str, inputs_json: str, *, namespace: str = "default", scope: str = "default",
    version: str = "1",
) -> str:
    """SHA-256 hex of the tool's identity and its canonical inputs."""
    head = _head(tool_name, namespace, scope, version)
    return hashlib.sha256(f"{head}\n{inputs_json}".encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _head(tool_name: str, namespace: str, scope: str, version: str) -> str:
    return canonical_json([FORMAT, namespace, tool_name, scope, version])


def make_fingerprint(
    tool_name: str,
    arguments: Any = None,
    *,
    namespace: str = "default",
    scope: str = "default",
    version: str = "1",
) -> str:
    """The fingerprint of a call of ``tool_name`` with ``arguments`` (any encodable value,
    usually the dict of bound arguments)."""
    return fingerprint_of(
        tool_name, encode_inputs(tool_name, arguments), namespace=namespace, scope=scope,
        version=version,
    )


REDACTED = "[redacted]"


def redact_inputs(arguments: Any, redact: Sequence[str] | Callable[[Any], Any]) -> Any:
    """What to store of ``arguments``: named values masked, or ``redact(arguments)``."""
    if callable(redact):
        return redact(arguments)
    for path in redact:
        arguments = _mask(arguments, path.split("."))
    return arguments


def _mask(value: Any, parts: list[str]) -> Any:
    if not isinstance(value, dict) or parts[0] not in value:
        return value
    masked = dict(value)  # copies only the spine of the path: the caller's data is untouched
    masked[parts[0]] = REDACTED if len(parts) == 1 else _mask(value[parts[0]], parts[1:])
    return masked
