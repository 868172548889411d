"""Fingerprints as properties of generated values and calls.

test_fingerprint_codec.py checks fixed examples; here hypothesis generates them. A key
must depend on the call's *shape* (the types and values of everything in it, with dict
and set order left out) and on nothing else: equal shapes give one key whatever form the
call took, different shapes give different keys, in every process and under every hash
seed. ``_shape`` below is that notion of equality written out independently of the codec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from singleflight_agents import Singleflight, Source, ToolExecutionOptions, make_fingerprint
from singleflight_agents.codec import canonical_json
from singleflight_agents.fingerprint import bind_arguments

# -- generated values -----------------------------------------------------------------

# Any text, control characters included, plus lone surrogates (st.characters leaves
# them out), the codec's own tags and look-alikes of numbers.
TEXT = (st.text(st.characters(exclude_categories=()), max_size=6)
        | st.sampled_from(["__sf__", "v", "c", "map", "tuple", "float", "1", "1.0", "true",
                           "null", "", "\n", '"', "\ud800", "a\udfff"]))
# The floats a careless encoding confuses, more often than st.floats() draws them.
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1.0, float("inf"), float("-inf"), 1e16, 5e-324])
# NaN is never equal to itself, so it can be a value but not a key or a set member
# (see test_dict_keys_that_tie_do_not_reorder_the_key for what goes wrong there).
HASHABLE_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | EDGE_FLOATS | TEXT | st.binary(max_size=4))
HASHABLES = st.recursive(
    HASHABLE_SCALARS,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=5,
)
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | EDGE_FLOATS
           | st.just(float("nan")) | TEXT | st.binary(max_size=4))
VALUES = st.recursive(
    SCALARS,
    lambda inner: (st.lists(inner, max_size=4)
                   | st.lists(inner, max_size=4).map(tuple)
                   | st.dictionaries(TEXT, inner, max_size=4)
                   | st.dictionaries(HASHABLES, inner, max_size=4)
                   | st.sets(HASHABLES, max_size=4)
                   | st.frozensets(HASHABLES, max_size=4)),
    max_leaves=10,
)
FAST = settings(max_examples=100, deadline=None)


def _shape(value: Any) -> Any:
    """What a fingerprint may depend on: types and values all the way down, not order.
    Floats by repr, so -0.0 != 0.0 and NaN == NaN; 1, 1.0, True and "1" all differ."""
    kind = type(value)
    if kind is float:
        return ("float", repr(value))
    if kind is list or kind is tuple:
        return (kind.__name__, tuple(_shape(item) for item in value))
    if kind is dict:
        return ("dict", frozenset((_shape(k), _shape(v)) for k, v in value.items()))
    if kind is set or kind is frozenset:
        return (kind.__name__, frozenset(_shape(item) for item in value))
    return (kind.__name__, value)


def _rebuild(value: Any, rnd: random.Random) -> Any:
    """A new object of the same shape, its dicts and sets filled in another order."""
    kind = type(value)
    if kind is list or kind is tuple:
        return kind(_rebuild(item, rnd) for item in value)
    if kind is dict:
        items = [(_rebuild(k, rnd), _rebuild(v, rnd)) for k, v in value.items()]
        rnd.shuffle(items)
        return dict(items)
    if kind is set or kind is frozenset:
        members = [_rebuild(item, rnd) for item in value]
        rnd.shuffle(members)
        return kind(members)
    if kind is float:
        return float(repr(value))
    return value


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _twins(value: Any) -> list[Any]:
    """Values a careless encoding would confuse with ``value``."""
    kind = type(value)
    twins: list[Any] = [[value], (value,)]
    if kind is bool:
        twins += [int(value), float(value), str(value), str(int(value)).lower()]
    elif kind is int:
        twins += [str(value), value + 1]
        if abs(value) < 2**53:
            twins.append(float(value))
        if value in (0, 1):
            twins.append(bool(value))
    elif kind is float:
        twins += [repr(value), -value]  # -value: 0.0 <-> -0.0 as well
        if value.is_integer():
            twins.append(int(value))
    elif kind is str:
        twins += [value.encode("utf-8", "surrogatepass"), value + "\x00"]
    elif kind is bytes:
        twins.append(value.decode("latin-1"))
    elif value is None:
        twins += ["None", "null", 0, False, (), [], {}]
    elif kind is list:
        twins.append(tuple(value))
    elif kind is tuple:
        twins.append(list(value))
    elif kind is set:
        twins.append(frozenset(value))
    elif kind is frozenset:
        twins.append(set(value))
    elif kind is dict:
        twins.append([[k, v] for k, v in value.items()])
    # the value's own tagged form, given as plain data: a dict holding "__sf__" tags
    twins.append(json.loads(canonical_json(value)))
    return twins


def _mutations(value: Any) -> Iterator[Any]:
    """``value`` with one part, at any depth, replaced by one of its twins: every such
    copy, one per (position, twin)."""
    yield from _twins(value)
    kind = type(value)
    if kind is list or kind is tuple:
        for index, item in enumerate(value):
            for twin in _mutations(item):
                yield kind([*value[:index], twin, *value[index + 1:]])
    elif kind is dict:
        items = list(value.items())
        for index, (key, item) in enumerate(items):
            for twin in _mutations(item):
                yield dict([*items[:index], (key, twin), *items[index + 1:]])
            for twin in filter(_hashable, _mutations(key)):
                yield dict([*items[:index], (twin, item), *items[index + 1:]])
    elif kind is set or kind is frozenset:
        for member in value:
            for twin in filter(_hashable, _mutations(member)):
                yield kind([*(m for m in value if m is not member), twin])


def _key(value: Any) -> str:
    return make_fingerprint("t", value)


# -- values: equal shapes, equal keys; different shapes, different keys ------------------


@given(VALUES, VALUES)
@FAST
def test_two_values_share_a_key_exactly_when_their_shapes_are_equal(a: Any, b: Any) -> None:
    assert (_key(a) == _key(b)) == (_shape(a) == _shape(b))


@given(VALUES, st.randoms(use_true_random=False))
@FAST
def test_rebuilding_in_another_order_keeps_the_key(value: Any, rnd: random.Random) -> None:
    copy = _rebuild(value, rnd)
    assert _shape(copy) == _shape(value)
    assert _key(copy) == _key(value)
    assert _key(pickle.loads(pickle.dumps(value))) == _key(value)


@given(VALUES)
@FAST
def test_a_twin_anywhere_inside_changes_the_key(value: Any) -> None:
    """1 / 1.0 / True / "1", -0.0 / 0.0, list / tuple, set / frozenset, str / bytes, a
    value / its tagged JSON form: each such change, at each depth, gives another key."""
    key, shape = _key(value), _shape(value)
    for twin in _mutations(value):
        assert (_key(twin) == key) == (_shape(twin) == shape), twin


IDENTITY = st.tuples(TEXT, TEXT, TEXT, TEXT)  # tool name, namespace, scope, version


@given(IDENTITY, VALUES, st.data())
@FAST
def test_the_tool_identity_is_part_of_the_key(identity: tuple[str, str, str, str], value: Any,
                                              data: st.DataObject) -> None:
    # another identity: the same but for one part, which may move a character across
    # the boundary between two parts ("ab", "c" versus "a", "bc")
    other = list(identity)
    index = data.draw(st.integers(0, 3))
    other[index] = data.draw(TEXT)
    if index < 3 and identity[index]:
        other[index + 1] = identity[index][-1] + identity[index + 1]
    other_value = data.draw(st.just(value) | VALUES)

    def key(ident: tuple[str, ...] | list[str], val: Any) -> str:
        tool, namespace, scope, version = ident
        return make_fingerprint(tool, val, namespace=namespace, scope=scope, version=version)

    same = tuple(other) == identity and _shape(other_value) == _shape(value)
    assert (key(identity, value) == key(other, other_value)) == same


# -- calls through an engine: the form of the call does not matter ----------------------

DEFAULT_LIMIT = 10


def search(query: Any, limit: Any = DEFAULT_LIMIT, filters: Any = None) -> list[Any]:
    return [query, limit, filters]


def search_kw(query: Any, /, limit: Any = DEFAULT_LIMIT, *, filters: Any = None,
              **extra: Any) -> list[Any]:
    return [query, limit, filters, extra]


SEARCH = ToolExecutionOptions(tool_name="t.search", deterministic=True)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fp") / "receipts.db"


@pytest.fixture(scope="module")
def engine(store_path: Path) -> Iterator[Singleflight]:
    """An engine in mode "off": the key is computed as always, no receipt is read or written."""
    sf = Singleflight(store_path, secret=SECRET, mode="off")
    yield sf
    sf.close()


@pytest.fixture(scope="module")
def recorder(store_path: Path) -> Iterator[Singleflight]:
    """An engine in mode "record" on the same store."""
    sf = Singleflight(store_path, secret=SECRET)
    yield sf
    sf.close()


def _engine_key(sf: Singleflight, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                options: ToolExecutionOptions = SEARCH) -> str:
    outcome = sf.execute_sync(func, *args, options=options, **kwargs)
    assert outcome.source is Source.EXECUTED_UNSHARED
    return outcome.fingerprint


ARGUMENT = st.just(DEFAULT_LIMIT) | st.none() | VALUES


def _forms(query: Any, limit: Any, filters: Any) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Every way to call search(query, limit, filters)."""
    forms: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((query, limit, filters), {}),
        ((query, limit), {"filters": filters}),
        ((query,), {"filters": filters, "limit": limit}),
        ((), {"filters": filters, "query": query, "limit": limit}),
    ]
    if filters is None:
        forms.append(((query, limit), {}))
    if type(limit) is int and limit == DEFAULT_LIMIT:
        forms.append(((query,), {"filters": filters}))
        if filters is None:
            forms += [((query,), {}), ((), {"query": query})]
    return forms


@given(ARGUMENT, ARGUMENT, ARGUMENT, st.randoms(use_true_random=False))
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_form_of_a_call_has_one_key(engine: Singleflight, query: Any, limit: Any,
                                          filters: Any, rnd: random.Random) -> None:
    expected = make_fingerprint("t.search", {"query": query, "limit": limit, "filters": filters})
    for args, kwargs in _forms(query, limit, filters):
        args = tuple(_rebuild(a, rnd) for a in args)
        kwargs = {k: _rebuild(v, rnd) for k, v in kwargs.items()}
        assert make_fingerprint("t.search", bind_arguments(search, args, kwargs)) == expected
        assert _engine_key(engine, search, args, kwargs) == expected
    # key= chooses what identifies the call
    assert _engine_key(engine, search, (query, limit), {}, SEARCH.replace(
        key=lambda query, limit=DEFAULT_LIMIT, filters=None: query)) == _key_of("t.search", query)


def _key_of(tool: str, value: Any) -> str:
    return make_fingerprint(tool, value)


@given(ARGUMENT, ARGUMENT, st.dictionaries(st.sampled_from(["a", "b", "zz", "filter"]), VALUES),
       st.randoms(use_true_random=False))
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_keyword_only_and_extra_keywords(engine: Singleflight, query: Any, filters: Any,
                                         extra: dict[str, Any], rnd: random.Random) -> None:
    items = list(extra.items())
    rnd.shuffle(items)
    keys = {
        _engine_key(engine, search_kw, (query,), {"filters": filters, **extra}),
        _engine_key(engine, search_kw, (query, DEFAULT_LIMIT), {**dict(items), "filters": filters}),
    }
    if filters is None:
        keys.add(_engine_key(engine, search_kw, (query,), dict(reversed(items))))
    assert keys == {make_fingerprint("t.search", {
        "query": query, "limit": DEFAULT_LIMIT, "filters": filters, "extra": extra})}


@given(ARGUMENT, ARGUMENT, st.data())
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_different_calls_have_different_keys(engine: Singleflight, query: Any, limit: Any,
                                             data: st.DataObject) -> None:
    key = _engine_key(engine, search, (query, limit), {})
    other = data.draw(st.sampled_from(list(_mutations(limit))))
    assert (_engine_key(engine, search, (query, other), {}) == key) == (
        _shape(other) == _shape(limit))
    # the same values in other places
    assert (_engine_key(engine, search, (limit, query), {}) == key) == (
        _shape(limit) == _shape(query))
    # search(query, filters=limit) binds limit=10: never search(query, limit)
    assert _engine_key(engine, search, (query,), {"filters": limit}) != key


@given(ARGUMENT, ARGUMENT, st.randoms(use_true_random=False))
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_form_of_a_call_is_served_the_same_receipt(
        recorder: Singleflight, query: Any, limit: Any, rnd: random.Random) -> None:
    """With the store in use: after any form ran, every other form is a cache hit."""
    results = []
    for args, kwargs in _forms(query, limit, None):
        args = tuple(_rebuild(a, rnd) for a in args)
        results.append(recorder.execute_sync(search, *args, options=SEARCH, **kwargs))
    assert len({outcome.fingerprint for outcome in results}) == 1
    assert {outcome.source for outcome in results[1:]} == {Source.CACHE_HIT}
    for outcome in results:
        assert _shape(outcome.value) == _shape([query, limit, None])


# -- the same key in every process, under every hash seed -------------------------------

CHILD = """
import json, pickle, sys
from singleflight_agents import Singleflight, ToolExecutionOptions, make_fingerprint

def search(query, limit=10, filters=None):
    return None

batch = pickle.load(sys.stdin.buffer)
keys = [make_fingerprint("t", value) for value in batch]
options = ToolExecutionOptions(tool_name="t.search", deterministic=True)
with Singleflight(sys.argv[1], secret=sys.argv[2], mode="off") as sf:
    keys += [sf.execute_sync(search, value, filters=value, options=options).fingerprint
             for value in batch]
print(json.dumps(keys))
"""


@pytest.mark.slow
@given(st.lists(VALUES | st.sets(TEXT, min_size=2), min_size=40, max_size=40))
@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
def test_keys_are_the_same_in_other_processes_and_hash_seeds(
        engine: Singleflight, batch: list[Any]) -> None:
    """Sets of strings iterate in an order set by PYTHONHASHSEED: the keys must not."""
    expected = [_key(value) for value in batch]
    expected += [_engine_key(engine, search, (value,), {"filters": value}) for value in batch]
    payload = pickle.dumps(batch)
    db = str(Path(engine.db_path).with_name("child.db"))
    for seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        child = subprocess.run([sys.executable, "-c", CHILD, db, SECRET], input=payload,
                               env=env, capture_output=True, check=True, timeout=60)
        assert json.loads(child.stdout) == expected, seed


def test_keys_are_pinned() -> None:
    """Known keys: a change of the canonical form must come with a FORMAT bump."""
    assert make_fingerprint("t", {"x": 1}) == (
        "ac3c683e93b8100c8f1510f65e85729eef05c29298a138580918da071e8204d1")
    assert make_fingerprint("crm.lookup", {"email": "a@b", "tags": {"x", "y", "z"},
                                           "n": (1, 2.5), 3: None}) == (
        "702426baf255ce5070fb3d2701a0b41fd0b3540c1df92a8fac733c8fb28a8528")
    assert make_fingerprint("t.search", {"query": "q", "limit": 10, "filters": None},
                            namespace="ns", scope="s", version="2") == (
        "d6aa96b80a1b863dd4fb7e4ea621353e394418cd8c7e6f23fcc7508a280b7339")
    assert make_fingerprint("t", [1, 1.0, True, "1", b"1", -0.0, float("inf"), None, [], (),
                                  set(), frozenset(), {}]) == (
        "85f3dd8f7a6bbf0fd61d669665418da16c5f61d3d749abe3d5f074414c35df8f")


# -- known gaps ---------------------------------------------------------------------------


def test_dict_keys_that_tie_do_not_reorder_the_key() -> None:
    first, second = float("nan"), float("nan")
    assert _key({first: 1, second: 2}) == _key({second: 2, first: 1})


@dataclasses.dataclass
class IndexSearch:
    """A callable object, unhashable like every dataclass with eq=True."""

    index: str

    def __call__(self, query: str) -> str:
        return f"{self.index}:{query}"


def test_an_unhashable_callable_object_can_be_a_tool(recorder: Singleflight) -> None:
    options = SEARCH.replace(tool_name="t.index")
    outcome = recorder.execute_sync(IndexSearch("docs"), "q", options=options)
    assert outcome.value == "docs:q"
    assert outcome.fingerprint == make_fingerprint("t.index", {"query": "q"})


# -- what a tool declares: names, numbers, async callables (issue 12) ----------------------

NAME_FIELDS = st.sampled_from(["tool_name", "scope", "namespace", "version"])


@given(NAME_FIELDS, TEXT)
@FAST
def test_names_are_accepted_exactly_when_every_store_can_keep_them(
        recorder: Singleflight, field: str, text: str) -> None:
    """A lone surrogate (what os.fsdecode makes of bytes that are not UTF-8) is refused when
    declared, in one line; any other text is a name the call and its statistics can keep."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(ValueError, match=f"^ToolExecutionOptions.{field} .* lone surrogate"
                                             f" .*; pass plain text$"):
            SEARCH.replace(**{field: text})
        return
    options = SEARCH.replace(**{field: text})
    assert recorder.execute_sync(search, "q", options=options).value == ["q", DEFAULT_LIMIT, None]
    recorder.flush_stats()


TEN_YEARS, DAY = 3650 * 86_400, 86_400
BOUNDS = {  # what each number may be, as the error message states it
    "ttl_seconds": lambda v: 0 < v <= TEN_YEARS,
    "wait_timeout_seconds": lambda v: 0 < v <= TEN_YEARS,
    "lease_seconds": lambda v: 0.1 <= v <= DAY,
    "estimated_cost_usd": lambda v: 0 <= v <= 1e6,
}
EXTREME_NUMBERS = (st.floats() | st.integers() | st.integers(min_value=10**300)
                   | st.sampled_from([0, 0.1, 0.0999, DAY, DAY + 1e-9, TEN_YEARS, TEN_YEARS + 1,
                                      1e6, 1e6 + 0.01, 1e10, 1e306, -0.0, 5e-324, True]))


@pytest.fixture(scope="module")
def redis_engine() -> Iterator[Singleflight]:
    import redis
    from conftest import REDIS_URL, redis_or_skip

    prefix = f"sftest-props-{os.getpid()}"
    sf = Singleflight(store=f"{redis_or_skip()}?prefix={prefix}", secret=SECRET)
    yield sf
    sf.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@given(st.sampled_from(sorted(BOUNDS)), EXTREME_NUMBERS, st.booleans())
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_numbers_are_refused_when_declared_or_work_on_every_store(
        recorder: Singleflight, redis_engine: Singleflight, field: str, value: Any,
        on_redis: bool) -> None:
    """No number accepted at declaration may overflow later (a Redis expiry in milliseconds,
    a thread's wait, a timestamp, the run's sum of costs): it is refused, in one line, or
    the call runs and is stored."""
    accepted = type(value) is not bool and BOUNDS[field](value)
    if not accepted:
        with pytest.raises(ValueError, match=f"^ToolExecutionOptions.{field} must be .*, got "):
            SEARCH.replace(**{field: value})
        return
    sf = redis_engine if on_redis else recorder
    options = SEARCH.replace(tool_name=f"t.numbers.{field}", **{field: value})
    first = sf.execute_sync(search, repr(value), options=options)
    assert first.value == [repr(value), DEFAULT_LIMIT, None]
    assert first.source in (Source.EXECUTED, Source.CACHE_HIT)
    sf.flush_stats()


async def _double(x: Any) -> Any:
    return [x, x]


class _AsyncDouble:
    async def __call__(self, x: Any) -> Any:
        return [x, x]

    async def method(self, x: Any) -> Any:
        return [x, x]


class _SyncDouble:
    def __call__(self, x: Any) -> Any:
        return [x, x]


def _sync_double(x: Any) -> Any:
    return [x, x]


TOOL_KINDS = {  # name: (make the tool, whether calling it gives a coroutine)
    "async function": (lambda: _double, True),
    "async callable object": (_AsyncDouble, True),
    "async bound method": (lambda: _AsyncDouble().method, True),
    "partial of an async function": (lambda: functools.partial(_double), True),
    "partial of an async callable object": (lambda: functools.partial(_AsyncDouble()), True),
    "partial of a partial": (lambda: functools.partial(functools.partial(_AsyncDouble())), True),
    "sync function": (lambda: _sync_double, False),
    "sync callable object": (_SyncDouble, False),
    "partial of a sync callable object": (lambda: functools.partial(_SyncDouble()), False),
}


@given(st.sampled_from(sorted(TOOL_KINDS)), st.booleans(), HASHABLE_SCALARS)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_async_callables_of_every_kind_are_awaited(recorder: Singleflight, kind: str,
                                                   shared: bool, value: Any) -> None:
    """Whatever form an async tool takes, shared or not, from async code or sync: the
    caller gets its value, never an un-awaited coroutine."""
    make, coroutine = TOOL_KINDS[kind]
    tool = make()
    options = ToolExecutionOptions(tool_name=f"t.kind.{kind}", deterministic=shared)
    expected = _shape([value, value])
    outcome = asyncio.run(recorder.execute(tool, value, options=options))
    assert _shape(outcome.value) == expected, outcome.value
    assert _shape(recorder.execute_sync(tool, value, options=options).value) == expected
    from singleflight_agents.fingerprint import is_async_callable

    assert is_async_callable(tool) is coroutine
