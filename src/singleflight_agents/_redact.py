"""Redaction: what a receipt keeps of a call's inputs when ``redact=`` names secrets.

Paths are checked against the tool's signature and annotations when the tool is declared.
At each call the values they lead to are found in the Python arguments and masked in the
codec's tagged form (the caller's data is never changed); for a ``key=`` result or a
``do()`` identity, also wherever else they show. ``fingerprint`` binds a call to these.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, MutableSequence, Sequence
from typing import Any

from .codec import TAG, UnencodableError, canonical_text, to_tagged

REDACTED = "[redacted]"
_RECORDS = ("dataclass", "model", "namedtuple")  # codec tags of values with fixed fields
_MISSING = object()


def masked(ident: Any, paths: Redactor, secret_values: list[Any]) -> str:
    tagged = to_tagged(ident, True)
    for parts in paths.parts:
        tagged = _mask(tagged, parts, 0)
    secrets = _secrets(secret_values)
    if secrets:
        # Longest first: a secret inside another is masked with it, not cut out of it.
        texts = sorted({s for s in secrets if isinstance(s, str) and len(s) >= 4},
                       key=len, reverse=True)
        tagged = _scrub(tagged, secrets, texts)
    return canonical_text(tagged)


class Redactor:
    """``redact=`` paths checked against a tool's signature, and where each one leads."""

    def __init__(self, func: Callable[..., Any], signature: inspect.Signature | None,
                 var_keyword: str | None, paths: tuple[str, ...], tool_name: str) -> None:
        self.tool_name = tool_name
        self.parts: list[tuple[str, ...]] = []
        self.paths: dict[tuple[str, ...], str] = {}  # resolved parts -> the path as written
        params = signature.parameters if signature is not None else None
        hints = _hints(func) if params is not None else {}
        for path in paths:
            parts = tuple(path.split("."))
            if params is None:  # no signature: bound as {"args": ..., "kwargs": ...}
                if parts[0] not in ("args", "kwargs"):
                    parts = ("kwargs", *parts)
            elif parts[0] in params:
                if params[parts[0]].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                 inspect.Parameter.VAR_KEYWORD):
                    _check_fields(hints.get(parts[0]), parts, path, tool_name)
            elif var_keyword is not None:
                parts = (var_keyword, *parts)  # a keyword the caller may pass
            else:
                raise ValueError(
                    f"{tool_name}: redact path {path!r} names no argument of the tool (it "
                    f"takes: {', '.join(params) or 'nothing'}); name an argument, or a "
                    f"dotted path into one")
            self.parts.append(parts)
            self.paths[parts] = path

    def no_field(self, parts: tuple[str, ...], depth: int, record: str) -> ValueError:
        return ValueError(
            f"{self.tool_name}: redact path {self.paths[parts]!r} names no field of "
            f"{record} (at {parts[depth]!r}); fix the path, or the tool would store its value")

    def in_a_list(self, parts: tuple[str, ...], depth: int) -> ValueError:
        return ValueError(
            f"{self.tool_name}: redact path {self.paths[parts]!r} meets a list at "
            f"{parts[depth]!r}, which is not an index; name the item (e.g. "
            f"{'.'.join([*parts[:depth], '0', *parts[depth:]])!r}) or redact the whole "
            f"{'.'.join(parts[:depth])!r}")

    def values(self, arguments: dict[str, Any]) -> list[Any]:
        """What the paths lead to in ``arguments`` (absent ones left out); a record without
        the field a path names raises."""
        found = (_find(arguments, parts, self) for parts in self.parts)
        return [value for value in found if value is not _MISSING]


class IdentityPaths(Redactor):
    """``redact=`` paths into an identity (no signature to check them against)."""

    def __init__(self, paths: tuple[str, ...], tool_name: str) -> None:
        self.tool_name = tool_name
        self.parts = [tuple(path.split(".")) for path in paths]
        self.paths = dict(zip(self.parts, paths, strict=True))

    def values(self, arguments: Any) -> list[Any]:
        found = (_find(arguments, parts, self) for parts in self.parts)
        return [value for value in found if value is not _MISSING]


def _secrets(values: list[Any]) -> list[Any]:
    """``values`` tagged, with the strings inside them: what must not show in a key."""
    found: list[Any] = []
    for value in values:
        if value is None or isinstance(value, bool) or (isinstance(value, str) and not value):
            continue  # too common a value to mask wherever it shows
        try:
            tagged = to_tagged(value, True)
        except UnencodableError:
            continue  # not in the key as itself
        found.append(tagged)
        found += [text for text in _strings(tagged) if len(text) >= 4]  # 4: not "a", "id"
    return found


def _find(value: Any, parts: tuple[str, ...], paths: Redactor) -> Any:
    """The value at ``parts`` inside Python ``value``, or ``_MISSING``."""
    for depth, part in enumerate(parts):
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        elif isinstance(value, list | tuple) and not hasattr(value, "_fields"):
            if not part.isdigit():  # "items.token" would match nothing, and store the secret
                raise paths.in_a_list(parts, depth)
            value = value[int(part)] if int(part) < len(value) else _MISSING
        else:
            fields = _record_fields(value)
            if fields is None:
                return _MISSING
            if part not in fields:
                raise paths.no_field(parts, depth, type(value).__name__)
            value = getattr(value, part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _record_fields(value: Any) -> Iterable[str] | None:
    """The field names of a dataclass, named tuple or pydantic-style model; else ``None``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f.name for f in dataclasses.fields(value)]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(value._fields)
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and not isinstance(value, type):
        declared = getattr(type(value), "model_fields", None)
        if isinstance(declared, dict):  # pydantic: no need to dump the whole model
            return [*declared, *(getattr(type(value), "model_computed_fields", None) or ())]
        return list(model_dump())
    return None


def _mask(node: Any, parts: tuple[str, ...], depth: int) -> Any:
    """Tagged ``node`` with the value at ``parts[depth:]`` masked, copying only the spine of
    the path (the caller's data is untouched); a part it lacks leaves it as it is."""
    if depth == len(parts):
        return REDACTED
    part = parts[depth]
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            return node
        index = int(part)
        return [*node[:index], _mask(node[index], parts, depth + 1), *node[index + 1:]]
    if not isinstance(node, dict):
        return node  # None, a number, a string: an optional argument left out
    tag = node.get(TAG)
    if tag is None:
        if part not in node:
            return node
        return {**node, part: _mask(node[part], parts, depth + 1)}
    if tag in _RECORDS:  # a dataclass, model or named tuple: {"c": class, "v": fields}
        fields = node["v"]
        if part not in fields:
            return node
        return {**node, "v": {**fields, part: _mask(fields[part], parts, depth + 1)}}
    if tag == "map":
        pairs = [[k, _mask(v, parts, depth + 1) if k == part else v] for k, v in node["v"]]
        return {**node, "v": pairs}
    if tag == "tuple":
        return {**node, "v": _mask(node["v"], parts, depth)}
    return node


def _strings(node: Any) -> Iterable[str]:
    """Every string value inside tagged ``node`` (not the codec's own tag names)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, dict):
        for name, item in node.items():
            if TAG not in node or name == "v":
                yield from _strings(item)


def _scrub(node: Any, secrets: list[Any], texts: list[str]) -> Any:
    """Tagged ``node`` with each value equal to a secret masked, and each secret string
    masked inside longer strings."""
    if any(type(node) is type(secret) and node == secret for secret in secrets):
        return REDACTED
    if isinstance(node, str):
        for text in texts:
            node = node.replace(text, REDACTED)
        return node
    if isinstance(node, list):
        return [_scrub(item, secrets, texts) for item in node]
    if isinstance(node, dict) and TAG in node:  # the codec's tag names stay as they are
        return {name: _scrub(item, secrets, texts) if name == "v" else item
                for name, item in node.items()}
    if isinstance(node, dict):
        return {_scrub(name, secrets, texts): _scrub(item, secrets, texts)
                for name, item in node.items()}
    return node


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of ``func``'s parameters, or ``{}`` when they cannot be."""
    while isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, type):
        # the class's own annotations are its attributes', not its constructor's arguments
        func = typing.cast(Any, func).__init__
    elif not inspect.isroutine(func):
        func = type(func).__call__
    try:
        return typing.get_type_hints(func)
    except Exception:  # a name only a type checker sees: no check by annotations
        return {}


def _check_fields(hint: Any, parts: tuple[str, ...], path: str, tool_name: str) -> None:
    """Follow ``parts`` through annotated records (dataclasses, pydantic models, TypedDicts,
    named tuples): a name none of them has raises. Other types are open: not checked."""
    for depth, part in enumerate(parts[1:], start=1):
        if _is_sequence(hint) and not part.isdigit():
            raise ValueError(
                f"{tool_name}: redact path {path!r} meets a list at {part!r}, which is not an "
                f"index; name the item (e.g. {'.'.join([*parts[:depth], '0', *parts[depth:]])!r})"
                f" or redact the whole {'.'.join(parts[:depth])!r}")
        if _is_sequence(hint):
            args = typing.get_args(hint)
            hint = args[0] if args else None
            continue
        record = _record_type(hint)
        if record is None:
            return
        fields = _annotated_fields(record)
        if part not in fields:
            raise ValueError(
                f"{tool_name}: redact path {path!r} names no field of {record.__name__} (at "
                f"{part!r}; it has: {', '.join(fields)}); fix the path, or the tool would "
                f"store its value")
        hint = fields[part]


def _is_sequence(hint: Any) -> bool:
    """Whether ``hint`` names a list, tuple or sequence of items (``list[Token]``)."""
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and origin in (list, tuple, Sequence, MutableSequence)


def _record_type(hint: Any) -> type | None:
    """The record class ``hint`` names (also as ``X | None``), or ``None``."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _record_type(typing.get_args(hint)[0])
    if origin is typing.Union or origin is types.UnionType:
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        return _record_type(members[0]) if len(members) == 1 else None
    if not isinstance(hint, type):
        return None
    if isinstance(getattr(hint, "model_fields", None), dict) or dataclasses.is_dataclass(hint) \
            or typing.is_typeddict(hint) or (issubclass(hint, tuple) and hasattr(hint, "_fields")):
        return hint
    return None


def _annotated_fields(record: type) -> dict[str, Any]:
    model_fields = getattr(record, "model_fields", None)
    if isinstance(model_fields, dict):
        computed = getattr(record, "model_computed_fields", None) or {}
        return {**{name: field.annotation for name, field in model_fields.items()},
                **{name: Any for name in computed}}
    try:
        annotations = typing.get_type_hints(record)
    except Exception:  # a name only a type checker sees: the names still count
        annotations = {}
    names = ([f.name for f in dataclasses.fields(record)] if dataclasses.is_dataclass(record)
             else list(getattr(record, "_fields", None) or annotations))
    return {name: annotations.get(name, Any) for name in names}
