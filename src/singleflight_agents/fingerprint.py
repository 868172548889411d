"""Fingerprints: one key per (tool, arguments), whatever form the call took.

Arguments are bound to the function's signature with defaults applied, so ``f("a")``,
``f(x="a")`` and ``f()`` with default ``"a"`` are one call. They are then encoded
canonically (see :mod:`.codec`): ``1``, ``1.0``, ``True`` and ``"1"`` differ, tuples
differ from lists, dict and set order does not matter. Nothing is ever ``repr()``-ed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._redact import IdentityPaths, Redactor, masked
from .codec import UnencodableError, canonical_json

FORMAT = "sf1"
# Exact types whose equal values always encode alike: a call made only of them can reuse
# the key an equal call got. Not float: 0.0 == -0.0 but their encodings differ.
_PLAIN = frozenset((str, int, bool, type(None)))
_KEYS_MAX = 1024
_KEYS_INPUT_MAX = 1024  # characters of canonical inputs: at most ~2 MB per tool in all


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
        self.var_keyword = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        self.is_async = is_async_callable(func)
        self.redactors: dict[tuple[str, ...], Redactor] = {}  # by (tool name, *paths)
        self.keys: OrderedDict[tuple[Any, ...], tuple[str, str]] = OrderedDict()  # see remembered_key
        # A default a call may leave out is part of its key: only plain ones can be
        # remembered (a list default may have changed since).
        self.rememberable = self.signature is not None and all(
            p.default is p.empty or type(p.default) in _PLAIN for p in params)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self.names is not None and not kwargs and len(args) == len(self.names):
            return dict(zip(self.names, args, strict=True))
        if self.signature is None:
            return {"args": args, "kwargs": dict(kwargs)}
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments


def is_async_callable(func: Callable[..., Any]) -> bool:
    """Whether calling ``func`` gives a coroutine to await: an ``async def`` function or
    method, an object whose class has an ``async def __call__``, or a ``functools.partial``
    of either."""
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    if inspect.isroutine(func) or isinstance(func, type):
        return False  # a class makes an instance when called, whatever its __call__ does
    return inspect.iscoroutinefunction(type(func).__call__)


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




def remembered_key(bind: _Binder, head: tuple[str, ...], args: tuple[Any, ...],
                   kwargs: Mapping[str, Any]) -> tuple[tuple[Any, ...] | None, tuple[str, str] | None]:
    """``(memo key, (inputs, fingerprint))`` of a call whose arguments are all plain (str,
    int, bool, None): the second is what an equal earlier call got, if remembered. A memo
    key of ``None``: the call is not plain, key it in full."""
    types = (*map(type, args), *map(type, kwargs.values()))
    if not (bind.rememberable and _PLAIN.issuperset(types)):
        return None, None
    # The types are part of the key: True == 1, yet they encode differently.
    memo = (head, args, tuple(kwargs.items()), types)
    return memo, bind.keys.get(memo)


def remember_key(bind: _Binder, memo: tuple[Any, ...], keyed: tuple[str, str]) -> None:
    if len(keyed[0]) > _KEYS_INPUT_MAX:
        return  # a prompt-sized argument would be kept alive by the memo
    keys = bind.keys
    if len(keys) >= _KEYS_MAX:
        with contextlib.suppress(KeyError):  # another thread emptied it meanwhile
            keys.popitem(last=False)  # the oldest, in O(1) (a dict's first item is not)
    keys[memo] = keyed


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


def shown_inputs(tool_name: str, func: Callable[..., Any],
                 redact: Sequence[str] | Callable[[Any], Any], ident: Any,
                 args: tuple[Any, ...], kwargs: Mapping[str, Any], *, keyed: bool) -> str:
    """What is stored of a call's inputs: ``ident`` (the bound arguments, or ``key=``'s result
    when ``keyed``) as canonical JSON, with ``redact``'s paths masked, or ``redact(ident)``.

    Paths name the tool's arguments: a name that is no parameter of a tool taking
    ``**kwargs`` names one of those. A ``key=`` result is shaped as its function chose, so
    besides the paths it matches, every value found at a path in the arguments is masked
    wherever it shows up in the result, also inside a longer string.
    """
    if callable(redact):
        return encode_inputs(tool_name, redact(ident))
    paths = _redactor(func, redact, tool_name)
    # Found in the Python values, not in their encoding: a record says which fields it has
    # even when its encoding leaves one out (a pydantic Field(exclude=True)).
    values = paths.values(binder(func).bind(args, kwargs) if keyed else ident)
    return masked(ident, paths, values if keyed else [])


def shown_identity(tool_name: str, redact: Sequence[str] | Callable[[Any], Any],
                   identity: Any) -> str:
    """What is stored of a call keyed on ``identity`` (``Singleflight.do``): its canonical
    JSON with ``redact``'s dotted paths into it masked, and each value found there masked
    wherever else it shows; or ``redact(identity)``."""
    if callable(redact):
        return encode_inputs(tool_name, redact(identity))
    paths = IdentityPaths(tuple(redact), tool_name)
    return masked(identity, paths, paths.values(identity))


def check_redact(func: Callable[..., Any], redact: Any, tool_name: str) -> None:
    """A one-line ``ValueError`` now, naming any ``redact=`` path that matches nothing
    ``func`` takes (a list of paths; a function of the arguments is not checked)."""
    if redact is not None and not callable(redact):
        _redactor(func, redact, tool_name)


def _redactor(func: Callable[..., Any], redact: Sequence[str], tool_name: str) -> Redactor:
    """The checked paths of ``redact`` for ``func``, built once per binder."""
    bind = binder(func)
    key = (tool_name, *redact)
    found = bind.redactors.get(key)
    if found is None:
        found = bind.redactors[key] = Redactor(func, bind.signature, bind.var_keyword,
                                               tuple(redact), tool_name)
    return found
