"""The warm hit's shortcuts give the answers of the long way: a remembered key is the key
the arguments would get, and the codec's scanner reads what the full decoder reads."""

from __future__ import annotations

from typing import Any

import pytest

from singleflight_agents import Singleflight, codec, make_fingerprint
from singleflight_agents.fingerprint import binder


def _key(sf: Singleflight, tool: Any, *args: Any, **kwargs: Any) -> str:
    return sf.execute_sync(tool, *args, **kwargs).fingerprint


def test_remembered_keys_tell_apart_values_python_calls_equal(sqlite_sf: Singleflight) -> None:
    sf = sqlite_sf
    @sf.tool(deterministic=True, tool_name="t.plain")
    def tool(x: Any) -> Any:
        return x

    seen: dict[str, Any] = {}
    # Equal (and equally hashed) in Python, different calls: each twice, so the second
    # comes from the memo.
    for value in (1, True, 0, False, "1", None, 1.0, 0.0, -0.0):
        keys = {_key(sf, tool, value), _key(sf, tool, value)}
        assert keys == {make_fingerprint("t.plain", {"x": value})}
        assert seen.setdefault(next(iter(keys)), value) is value
    assert tool(True) is True and tool(1) == 1 and type(tool(1)) is int


def test_a_default_that_can_change_is_never_remembered(sqlite_sf: Singleflight) -> None:
    sf = sqlite_sf
    default: list[int] = []

    @sf.tool(deterministic=True, tool_name="t.default")
    def tool(x: int, seen: list[int] = default) -> int:
        return x + len(seen)

    first = _key(sf, tool, 1)
    default.append(5)
    assert _key(sf, tool, 1) != first
    assert tool(1) == 2


def test_call_forms_and_keywords_share_one_key(sqlite_sf: Singleflight) -> None:
    sf = sqlite_sf
    @sf.tool(deterministic=True, tool_name="t.forms")
    def tool(x: str, y: str = "b") -> str:
        return x + y

    keys = {_key(sf, tool, "a"), _key(sf, tool, "a", "b"), _key(sf, tool, x="a", y="b"),
            _key(sf, tool, "a", y="b"), _key(sf, tool, y="b", x="a"), _key(sf, tool, "a")}
    assert len(keys) == 1
    assert _key(sf, tool, "a", "c") not in keys


def test_the_memo_is_bounded(sqlite_sf: Singleflight) -> None:
    sf = sqlite_sf
    def tool(x: int) -> int:
        return x

    wrapped = sf.tool(tool, side_effecting=False, deterministic=True, tool_name="t.bounded")
    for i in range(3000):
        assert _key(sf, wrapped, i) == make_fingerprint("t.bounded", {"x": i})
    assert 0 < len(binder(tool).keys) <= 1024


@pytest.mark.parametrize("text", ['1', ' 1', '[1, 2]', '{"a": [1, {"b": null}]}',
                                  '{"__sf__":"tuple","v":[1,2]}', '"\\u00e9"', '1e400'])
def test_the_scanner_reads_what_the_decoder_reads(text: str) -> None:
    import json

    plain = json.loads(text, object_hook=codec._untag)
    assert codec.decode("json", text) == plain


@pytest.mark.parametrize("text", ['1 x', '', 'nul', '[1,', '{"a":1}}'])
def test_the_scanner_leaves_bad_text_to_the_decoder(text: str) -> None:
    with pytest.raises(ValueError):
        codec.decode("json", text)


def test_a_long_argument_is_never_remembered(sqlite_sf: Singleflight) -> None:
    def tool(prompt: str) -> int:
        return len(prompt)

    wrapped = sqlite_sf.tool(tool, deterministic=True, tool_name="t.long")
    assert wrapped("x" * 100_000) == 100_000 and wrapped("short") == 5
    assert [len(inputs) for inputs, _ in binder(tool).keys.values()] == [len('{"prompt":"short"}')]
