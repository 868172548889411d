"""``do`` / ``do_sync``: the engine's primitive, one run of ``fn()`` per tool name and identity."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import SECRET, all_joined, joined_after

from singleflight_agents import ReplayMissError, Session, Singleflight, Source, ToolExecutionOptions

SHARED = ToolExecutionOptions(deterministic=True)


async def test_async_callers_share_one_run(sf: Singleflight,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    release, joined = asyncio.Event(), joined_after(monkeypatch, 50)
    runs = 0

    async def fetch() -> dict[str, Any]:
        nonlocal runs
        runs += 1
        await release.wait()
        return {"answer": 42}

    tasks = [asyncio.create_task(sf.do("t.fetch", {"q": "a"}, fetch, options=SHARED))
             for _ in range(50)]
    await all_joined(joined)
    release.set()
    outcomes = await asyncio.gather(*tasks)
    assert runs == 1
    assert Counter(o.source for o in outcomes) == {Source.EXECUTED: 1, Source.SHARED_WAIT: 49}
    again = await sf.do("t.fetch", {"q": "a"}, fetch, options=SHARED)
    assert (again.source, again.value, runs) == (Source.CACHE_HIT, {"answer": 42}, 1)


def test_threads_share_one_run_and_identities_compare_by_value(sf: Singleflight) -> None:
    started, release = threading.Event(), threading.Event()
    runs = 0

    def fetch() -> str:
        nonlocal runs
        runs += 1
        started.set()
        release.wait(10)
        return "value"

    def call(i: int) -> Any:
        identity = {"b": [1, 2], "a": "x"} if i % 2 else {"a": "x", "b": [1, 2]}
        return sf.do_sync("t.fetch", identity, fetch, options=SHARED)

    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(call, 0)
        assert started.wait(10)
        rest = [pool.submit(call, i) for i in range(1, 8)]
        release.set()
        outcomes = [first.result(10)] + [f.result(10) for f in rest]
    assert runs == 1 and {o.value for o in outcomes} == {"value"}
    assert outcomes[0].fingerprint == outcomes[1].fingerprint


async def test_a_function_may_return_a_plain_value_or_a_coroutine(sf: Singleflight) -> None:
    async def coroutine() -> int:
        return 7

    assert (await sf.do("t.plain", 1, lambda: 5, options=SHARED)).value == 5
    assert (await sf.do("t.coro", 1, coroutine, options=SHARED)).value == 7
    assert sf.do_sync("t.coro-sync", 1, coroutine, options=SHARED).value == 7


def test_do_and_execute_share_a_receipt_for_the_same_name_and_arguments(sf: Singleflight) -> None:
    runs: list[str] = []

    def lookup(city: str, units: str = "metric") -> str:
        runs.append(city)
        return f"{city} in {units}"

    options = SHARED.replace(tool_name="t.lookup")
    first = sf.execute_sync(lookup, "Oslo", options=options)
    again = sf.do_sync("t.lookup", {"city": "Oslo", "units": "metric"},
                       lambda: lookup("Oslo"), options=SHARED)
    assert (first.source, again.source, again.value, runs) == (
        Source.EXECUTED, Source.CACHE_HIT, "Oslo in metric", ["Oslo"])


def test_unshared_runs_every_time_and_failures_are_not_stored(sf: Singleflight) -> None:
    runs = []
    for _ in range(2):
        assert sf.do_sync("t.write", 1, lambda: runs.append(1),
                          options=ToolExecutionOptions(side_effecting=True)).source \
            is Source.EXECUTED_UNSHARED
    assert len(runs) == 2

    def fail() -> None:
        runs.append(2)
        raise ValueError("boom")

    for _ in range(2):
        with pytest.raises(ValueError, match="boom"):
            sf.do_sync("t.fail", 1, fail, options=SHARED)
    assert runs.count(2) == 2


def test_redact_is_a_function_of_the_identity(sf: Singleflight) -> None:
    options = SHARED.replace(redact=lambda identity: {**identity, "token": "[redacted]"})
    sf.do_sync("t.redacted", {"q": "a", "token": "secret-1"}, lambda: 1, options=options)
    stored = [r.inputs for r in sf.store.iter_receipts() if r.tool_name == "t.redacted"]
    assert stored == ['{"q":"a","token":"[redacted]"}']
    paths = SHARED.replace(redact=["request.headers.authorization"])
    identity = {"request": {"headers": {"authorization": "Bearer sk-12345"}, "q": "a"},
                "echo": "sent with Bearer sk-12345"}
    sf.do_sync("t.paths", identity, lambda: 1, options=paths)
    stored = [r.inputs for r in sf.store.iter_receipts() if r.tool_name == "t.paths"]
    assert stored == ['{"echo":"sent with [redacted]","request":{"headers":{"authorization":'
                      '"[redacted]"},"q":"a"}}']
    with pytest.raises(ValueError, match="meets a list"):
        sf.do_sync("t.list", {"items": [{"k": "v"}]}, lambda: 1,
                   options=SHARED.replace(redact=["items.k"]))


def test_replay_serves_receipts_and_a_miss_raises(sf: Singleflight, store_url: str) -> None:
    sf.do_sync("t.replayed", "a", lambda: "recorded", options=SHARED)
    with Session(store_url, mode="replay", secret=SECRET) as run, run.scope("t"):
        assert sf.do_sync("t.replayed", "a", lambda: "live", options=SHARED).value == "recorded"
        with pytest.raises(ReplayMissError, match=r"t\.replayed: no receipt to replay"):
            sf.do_sync("t.replayed", "b", lambda: "live", options=SHARED)


def test_bad_arguments_are_refused_by_name(sf: Singleflight) -> None:
    with pytest.raises(TypeError, match="expected a function to run"):
        sf.do_sync("t.x", 1, "not callable", options=SHARED)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot be fingerprinted"):
        sf.do_sync("t.x", {"a": object()}, lambda: 1, options=SHARED)
    with pytest.raises(ValueError, match="tool name"):
        sf.do_sync("", 1, lambda: 1, options=SHARED)


def test_max_age_reruns_an_older_receipt_outside_replay_and_replay_still_serves_it(
        sf: Singleflight, store_url: str) -> None:
    answers = iter(["first", "second", "third"])
    fresh = SHARED.replace(max_age_seconds=0)
    assert sf.do_sync("t.listing", 1, lambda: next(answers), options=fresh).value == "first"
    again = sf.do_sync("t.listing", 1, lambda: next(answers), options=fresh)
    assert (again.source, again.value) == (Source.EXECUTED, "second")  # replaced, not served
    assert sf.do_sync("t.listing", 1, lambda: "unused", options=SHARED).value == "second"
    with Session(store_url, mode="replay", secret=SECRET):
        assert sf.do_sync("t.listing", 1, lambda: "live", options=fresh).value == "second"
    with pytest.raises(ValueError, match="max_age_seconds must be None, or a number"):
        SHARED.replace(max_age_seconds=-1)


async def test_max_age_zero_still_shares_a_call_in_flight(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()
    runs = []

    async def listing() -> str:
        runs.append(1)
        await release.wait()
        return "tools"

    fresh = SHARED.replace(max_age_seconds=0)
    joined = joined_after(monkeypatch, 4)
    tasks = [asyncio.create_task(sf.do("t.flight", 1, listing, options=fresh)) for _ in range(4)]
    await all_joined(joined)
    release.set()
    assert [o.value for o in await asyncio.gather(*tasks)] == ["tools"] * 4 and len(runs) == 1
