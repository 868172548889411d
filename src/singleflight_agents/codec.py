"""Value encoding: tagged JSON that round-trips Python types, and its canonical form.

JSON alone loses types (tuples become lists, int keys become strings), so values
that JSON cannot say exactly are written as ``{"__sf__": tag, "v": ...}``. The same
walk, in canonical mode, sorts dict keys and set members and also accepts one-way
types (enums, dataclasses, pydantic-style models, paths) for fingerprints.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import importlib
import json
import math
import sys
from collections.abc import Callable
from typing import Any

TAG = "__sf__"
JSON = "json"
PICKLE = "pickle"


class UnencodableError(TypeError):
    """A value has no encoding; ``path`` says where it sits inside the argument."""

    def __init__(self, type_name: str) -> None:
        super().__init__(type_name)
        self.type_name = type_name
        self.path: list[str] = []

    def where(self, root: str) -> str:
        return root + "".join(reversed(self.path))


# Built once: json.dumps/loads with options would build a new encoder or decoder per call.
# ASCII output: lone surrogates (os.listdir can return them) stay encodable everywhere.
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode
_compact = json.JSONEncoder(separators=(",", ":")).encode


def _float(value: float, canonical: bool) -> Any:
    if math.isfinite(value):
        return value
    return {TAG: "float", "v": repr(value)}


def _seq(value: list[Any] | tuple[Any, ...], canonical: bool) -> list[Any]:
    out = []
    for index, item in enumerate(value):
        try:
            out.append(to_tagged(item, canonical))
        except UnencodableError as exc:
            exc.path.append(f"[{index}]")
            raise
    return out


def _dict(value: dict[Any, Any], canonical: bool) -> Any:
    if TAG not in value and all(type(k) is str for k in value):
        out = {}
        for k, v in value.items():
            try:
                out[k] = to_tagged(v, canonical)
            except UnencodableError as exc:
                exc.path.append(f"[{k!r}]")
                raise
        return out
    pairs = []
    for k, v in value.items():
        try:
            pairs.append([to_tagged(k, canonical), to_tagged(v, canonical)])
        except UnencodableError as exc:
            exc.path.append(f"[{k!r}]")
            raise
    if canonical:
        pairs.sort(key=_dumps)  # the whole pair: keys with one JSON (NaN) still order stably
    return {TAG: "map", "v": pairs}


def _set(value: set[Any] | frozenset[Any], canonical: bool) -> Any:
    items = [to_tagged(item, canonical) for item in value]
    items.sort(key=_dumps)
    return {TAG: "set" if type(value) is set else "frozenset", "v": items}


def _one_way(value: Any) -> Any:
    """Canonical-only encodings: fingerprints need them, results cannot rebuild them."""
    cls = type(value)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(value, enum.Enum):
        return {TAG: "enum", "c": name, "v": to_tagged(value.value, True)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {TAG: "dataclass", "c": name, "v": to_tagged(fields, True)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {TAG: "namedtuple", "c": name, "v": to_tagged(dict(value._asdict()), True)}
    pathlib = sys.modules.get("pathlib")
    if pathlib is not None and isinstance(value, pathlib.PurePath):
        return {TAG: "path", "v": str(value)}
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return {TAG: "model", "c": name, "v": to_tagged(model_dump(), True)}
    raise UnencodableError(name)


_ENCODERS: dict[type, Callable[[Any, bool], Any]] = {
    float: _float,
    list: _seq,
    tuple: lambda v, c: {TAG: "tuple", "v": _seq(v, c)},
    dict: _dict,
    set: _set,
    frozenset: _set,
    bytes: lambda v, c: {TAG: "bytes", "v": base64.b64encode(v).decode("ascii")},
    dt.datetime: lambda v, c: {TAG: "datetime", "v": v.isoformat()},
    dt.date: lambda v, c: {TAG: "date", "v": v.isoformat()},
    dt.time: lambda v, c: {TAG: "time", "v": v.isoformat()},
    dt.timedelta: lambda v, c: {TAG: "timedelta", "v": [v.days, v.seconds, v.microseconds]},
}
# Keyed by name, so their modules need not be imported until a value of theirs shows up.
_ENCODERS_BY_NAME: dict[str, Callable[[Any, bool], Any]] = {
    "decimal.Decimal": lambda v, c: {TAG: "decimal", "v": str(v)},
    "uuid.UUID": lambda v, c: {TAG: "uuid", "v": str(v)},
}


def _from(module: str, name: str) -> Callable[[Any], Any]:
    return lambda v: getattr(importlib.import_module(module), name)(v)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "float": float,
    "tuple": tuple,
    "map": lambda pairs: {k: v for k, v in pairs},
    "set": set,
    "frozenset": frozenset,
    "bytes": base64.b64decode,
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "timedelta": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "decimal": _from("decimal", "Decimal"),
    "uuid": _from("uuid", "UUID"),
}


def to_tagged(value: Any, canonical: bool = False) -> Any:
    """The JSON-ready tagged form of ``value``; raises :class:`UnencodableError`."""
    cls = type(value)
    if cls is str or cls is int or cls is bool or value is None:
        return value
    encoder = _ENCODERS.get(cls)
    if encoder is not None:
        return encoder(value, canonical)
    encoder = _ENCODERS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    if encoder is not None:
        _ENCODERS[cls] = encoder
        return encoder(value, canonical)
    if canonical:
        return _one_way(value)
    raise UnencodableError(f"{cls.__module__}.{cls.__qualname__}")


def _untag(obj: dict[str, Any]) -> Any:
    tag = obj.get(TAG)
    if tag is None:
        return obj
    return _DECODERS[tag](obj["v"])


_decoder = json.JSONDecoder(object_hook=_untag)
_loads = _decoder.decode
_scan: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def canonical_json(value: Any) -> str:
    """Canonical JSON text of ``value``: equal values give equal text."""
    return _dumps(to_tagged(value, True))


def canonical_text(tagged: Any) -> str:
    """Canonical JSON text of a value already in its canonical tagged form."""
    return _dumps(tagged)


def encode(value: Any, allow_pickle: bool = False) -> tuple[str, str]:
    """``(codec, text)`` for a result; raises :class:`UnencodableError` if neither codec fits."""
    try:
        return JSON, _compact(to_tagged(value))
    except UnencodableError:
        if not allow_pickle:
            raise
    import pickle

    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise UnencodableError(type(value).__qualname__) from exc
    return PICKLE, base64.b64encode(data).decode("ascii")


def decode(codec: str, text: str, allow_pickle: bool = False) -> Any:
    """The value ``encode`` produced. Callers verify the receipt's signature first."""
    if codec == JSON:
        # Our own compact text, read by the scanner alone (decode() also skips whitespace
        # with two regular expressions); anything else takes the full path.
        try:
            value, end = _scan(text, 0)
        except (StopIteration, ValueError):
            end = -1
        return value if end == len(text) else _loads(text)
    if codec == PICKLE and allow_pickle:
        import pickle

        return pickle.loads(base64.b64decode(text))
    raise ValueError(f"codec {codec!r} is not allowed here (pickle needs allow_pickle=True)")
