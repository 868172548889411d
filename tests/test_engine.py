"""The engine in one process: tasks, threads, event loops, failures, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from _backdoor import lease_expiries
from conftest import all_joined, joined_after

from singleflight_agents import (
    ExecutionOutcome,
    Singleflight,
    Source,
    ToolExecutionOptions,
)
from singleflight_agents.store._liveness import platform_lock

SHARED = ToolExecutionOptions(tool_name="t.shared", deterministic=True)


def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


async def test_1000_async_callers_of_an_async_tool_execute_once(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    release, joined = asyncio.Event(), joined_after(monkeypatch, 1000)
    runs = 0

    async def search(query: str) -> dict[str, object]:
        nonlocal runs
        runs += 1
        await release.wait()
        return {"query": query, "hits": (1, 2)}

    tasks = [asyncio.create_task(sf.execute(search, "q", options=SHARED)) for _ in range(1000)]
    await all_joined(joined)  # every task reached the flight before the tool returns
    release.set()
    outcomes = await asyncio.gather(*tasks)
    assert runs == 1
    assert Counter(o.source for o in outcomes) == {Source.EXECUTED: 1, Source.SHARED_WAIT: 999}
    assert all(o.value == {"query": "q", "hits": (1, 2)} for o in outcomes)
    # each waiter gets its own copy: mutating one does not change another's
    outcomes[0].value["query"] = "changed"
    assert outcomes[1].value["query"] == "q"


async def test_1000_async_callers_of_a_sync_tool_use_one_thread(sf: Singleflight) -> None:
    started, release = threading.Event(), threading.Event()
    runs = 0

    def lookup(email: str) -> str:
        nonlocal runs
        runs += 1
        started.set()
        assert release.wait(30)
        return email.upper()

    def owners() -> int:
        return sum(t.name == "singleflight-owner" for t in threading.enumerate())

    owners_before = owners()
    tasks = [asyncio.create_task(sf.execute(lookup, "a@b", options=SHARED)) for _ in range(1000)]
    await asyncio.to_thread(started.wait, 30)
    # the default executor is not starved: it still runs other work while the tool blocks
    assert await asyncio.get_running_loop().run_in_executor(None, lambda: 42) == 42
    assert owners() - owners_before == 1  # one thread runs the tool; 999 callers just await
    release.set()
    outcomes = await asyncio.gather(*tasks)
    assert runs == 1
    assert {o.value for o in outcomes} == {"A@B"}
    assert Counter(o.source for o in outcomes)[Source.EXECUTED] == 1


def test_32_threads_execute_once(sf: Singleflight) -> None:
    barrier = threading.Barrier(32)
    release = threading.Event()
    runs = 0
    outcomes: list[ExecutionOutcome] = []

    @sf.tool(tool_name="crm.lookup", deterministic=True)
    def lookup(email: str) -> dict[str, str]:
        nonlocal runs
        runs += 1
        assert release.wait(30)
        return {"email": email}

    def caller() -> None:
        barrier.wait()
        outcomes.append(sf.execute_sync(lookup, "x@y"))

    threads = [threading.Thread(target=caller) for _ in range(32)]
    for thread in threads:
        thread.start()
    _wait_until(lambda: runs == 1)
    release.set()
    for thread in threads:
        thread.join(30)
    assert runs == 1
    assert len(outcomes) == 32
    assert all(o.value == {"email": "x@y"} for o in outcomes)
    assert {o.source for o in outcomes} <= {Source.EXECUTED, Source.SHARED_WAIT, Source.CACHE_HIT}


def test_later_calls_are_cache_hits_with_the_same_types(sf: Singleflight) -> None:
    runs = 0

    @sf.tool(tool_name="t.compute", deterministic=True)
    def compute(n: int) -> object:
        nonlocal runs
        runs += 1
        return {"pair": (n, n + 1), 7: {"nested": [1.5, None, True]}, "raw": b"\x00\xff"}

    first = sf.execute_sync(compute, 3)
    second = sf.execute_sync(compute, 3)
    assert (first.source, second.source) == (Source.EXECUTED, Source.CACHE_HIT)
    assert second.value == first.value
    assert type(second.value["pair"]) is tuple and 7 in second.value
    assert second.receipt is not None and sf.verify_receipt(second.receipt)
    assert compute(3) == first.value and runs == 1


def test_positional_keyword_and_default_forms_share_one_key(sf: Singleflight) -> None:
    runs = 0

    @sf.tool(tool_name="t.greet", deterministic=True)
    def greet(name: str = "ada", punctuation: str = "!") -> str:
        nonlocal runs
        runs += 1
        return name + punctuation

    assert greet("ada") == greet(name="ada") == greet() == greet("ada", "!") == "ada!"
    assert runs == 1
    greet("bob")
    assert runs == 2


def test_sharing_rules(sf: Singleflight) -> None:
    runs: Counter[str] = Counter()

    def tool(kind: str) -> str:
        runs[kind] += 1
        return kind

    cases = {
        "deterministic": (dict(deterministic=True), Source.CACHE_HIT),
        "bounded_read": (dict(bounded_read=True), Source.CACHE_HIT),
        "undeclared": ({}, Source.EXECUTED_UNSHARED),
        "side_effecting": (dict(side_effecting=True), Source.EXECUTED_UNSHARED),
        "both": (dict(deterministic=True, side_effecting=True), Source.EXECUTED_UNSHARED),
    }
    for kind, (flags, second_source) in cases.items():
        options = ToolExecutionOptions(tool_name=f"t.{kind}", **flags)
        sf.execute_sync(tool, kind, options=options)
        assert sf.execute_sync(tool, kind, options=options).source is second_source, kind
    assert runs == {"deterministic": 1, "bounded_read": 1, "undeclared": 2,
                    "side_effecting": 2, "both": 2}


async def test_failure_reaches_every_waiter_and_is_not_cached(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    release, joined = asyncio.Event(), joined_after(monkeypatch, 50)
    runs = 0

    async def flaky(x: int) -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        if runs == 1:
            raise ConnectionError("upstream 503")
        return x

    tasks = [asyncio.create_task(sf.execute(flaky, 1, options=SHARED)) for _ in range(50)]
    await all_joined(joined)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) and str(r) == "upstream 503" for r in results)
    assert runs == 1
    assert (await sf.execute(flaky, 1, options=SHARED)).source is Source.EXECUTED
    assert runs == 2
    assert sf.summary()["failures"] == 1


async def test_cancelled_owner_hands_over_to_a_waiter(sf: Singleflight) -> None:
    entered = asyncio.Event()
    runs = 0

    async def slow(x: int) -> int:
        nonlocal runs
        runs += 1
        entered.set()
        if runs == 1:
            await asyncio.Event().wait()  # the first owner never finishes by itself
        return x * 10

    owner = asyncio.create_task(sf.execute(slow, 4, options=SHARED))
    await entered.wait()
    waiters = [asyncio.create_task(sf.execute(slow, 4, options=SHARED)) for _ in range(20)]
    await asyncio.sleep(0)
    owner.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert owner.cancelled()
    assert [o.value for o in outcomes] == [40] * 20
    assert runs == 2
    assert Counter(o.source for o in outcomes)[Source.EXECUTED] == 1


async def test_sync_tool_called_from_inside_a_running_loop(sf: Singleflight) -> None:
    @sf.tool(deterministic=True)
    def add(a: int, b: int) -> int:
        return a + b

    @sf.tool(deterministic=True)
    async def double(a: int) -> int:
        await asyncio.sleep(0)
        return 2 * a

    assert add(1, 2) == 3  # sync call on the loop's thread
    assert sf.execute_sync(double, 21).value == 42  # async tool through the sync entry
    assert sf.execute_sync(double, 21).source is Source.CACHE_HIT


async def test_sync_waiter_on_the_owners_loop_does_not_deadlock(sf: Singleflight) -> None:
    entered = asyncio.Event()

    async def slow(x: int) -> int:
        entered.set()
        await asyncio.sleep(0.01)
        return x

    owner = asyncio.create_task(sf.execute(slow, 1, options=SHARED))
    await entered.wait()
    with pytest.warns(RuntimeWarning, match="event loop"):
        outcome = sf.execute_sync(slow, 1, options=SHARED)
    assert outcome.value == 1 and outcome.source is Source.EXECUTED_FALLBACK
    assert (await owner).source is Source.EXECUTED


def test_several_event_loops_share_one_engine(sf: Singleflight) -> None:
    runs = 0
    barrier = threading.Barrier(4)

    async def fetch(x: int) -> int:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return x

    async def burst() -> list[ExecutionOutcome]:
        barrier.wait()
        return await asyncio.gather(*[sf.execute(fetch, 7, options=SHARED) for _ in range(25)])

    results: list[list[ExecutionOutcome]] = []
    threads = [threading.Thread(target=lambda: results.append(asyncio.run(burst())))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert runs == 1
    assert sum(len(r) for r in results) == 100
    assert asyncio.run(sf.execute(fetch, 7, options=SHARED)).source is Source.CACHE_HIT


def test_unencodable_argument_names_the_argument(sf: Singleflight) -> None:
    class Opaque:
        pass

    def tool(query: str, context: dict[str, object]) -> str:
        return query

    with pytest.raises(TypeError, match=r"context\['client'\]\[1\].*Opaque.*key="):
        sf.execute_sync(tool, "q", {"client": [1, Opaque()]}, options=SHARED)
    keyed = SHARED.replace(key=lambda query, context: query)
    assert sf.execute_sync(tool, "q", {"client": Opaque()}, options=keyed).value == "q"
    assert sf.execute_sync(tool, "q", {"client": Opaque()}, options=keyed).source is Source.CACHE_HIT


def test_unencodable_result_reaches_the_caller_but_is_not_persisted(sf: Singleflight) -> None:
    class Result:
        def __init__(self, n: int) -> None:
            self.n = n

    runs = 0

    def tool(n: int) -> Result:
        nonlocal runs
        runs += 1
        return Result(n)

    with pytest.warns(RuntimeWarning, match="t.shared.*not persisted"):
        assert sf.execute_sync(tool, 1, options=SHARED).value.n == 1
    assert sf.execute_sync(tool, 1, options=SHARED).source is Source.EXECUTED
    assert runs == 2
    assert sf.summary()["not_persisted"] == 2


def test_pickle_only_when_allowed(sf: Singleflight) -> None:
    pickled = SHARED.replace(tool_name="t.pickled", allow_pickle=True)
    assert sf.execute_sync(complex, 1, 2, options=pickled).value == complex(1, 2)
    hit = sf.execute_sync(complex, 1, 2, options=pickled)
    assert hit.source is Source.CACHE_HIT and hit.value == complex(1, 2)
    assert hit.receipt is not None and hit.receipt.codec == "pickle"


def test_ttl_expiry_re_executes(sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    options = SHARED.replace(ttl_seconds=60)
    sf.execute_sync(str, "a", options=options)
    assert sf.execute_sync(str, "a", options=options).source is Source.CACHE_HIT
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 61)
    assert sf.execute_sync(str, "a", options=options).source is Source.EXECUTED


def test_heartbeat_renews_the_lease_of_a_slow_tool(sf: Singleflight) -> None:
    renewals = []

    def slow(x: int) -> int:
        seen: set[float] = set()
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:  # three distinct expiry times
            seen.update(lease_expiries(sf.store))
            time.sleep(0.01)
        renewals.extend(sorted(seen))
        return x

    options = SHARED.replace(lease_seconds=0.3)
    assert sf.execute_sync(slow, 5, options=options).source is Source.EXECUTED
    assert len(renewals) >= 3, "the lease was not renewed while the tool ran"


def test_cache_hits_do_not_write_statistics(sqlite_sf: Singleflight, db_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    sf = sqlite_sf
    sf.execute_sync(str, "warm", options=SHARED)
    sf.flush_stats()
    db = sqlite3.connect(db_path)
    request.addfinalizer(db.close)
    before = db.execute("SELECT updated_at FROM stats").fetchall()
    changes = db.execute("PRAGMA data_version").fetchone()
    for _ in range(200):
        assert sf.execute_sync(str, "warm", options=SHARED).source is Source.CACHE_HIT
    assert db.execute("PRAGMA data_version").fetchone() == changes  # nobody wrote the file
    assert db.execute("SELECT updated_at FROM stats").fetchall() == before
    summary = sf.summary()
    assert summary["cache_hits"] == 200 and summary["unique_executions"] == 1
    assert summary["tools"]["t.shared"]["calls"] == 201


def test_summary_keeps_the_documented_keys(sf: Singleflight) -> None:
    priced = SHARED.replace(estimated_cost_usd=0.25)
    for _ in range(3):
        sf.execute_sync(str, "x", options=priced)
    summary = sf.summary()
    assert {"unique_executions", "avoided_calls", "dollars_saved", "latency_saved_ms",
            "tools", "db_path"} <= set(summary)
    assert summary["avoided_calls"] == 2 and summary["dollars_saved"] == 0.5
    assert summary["db_path"] == str(sf.store.url)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="ttl_seconds must be a positive number"):
        ToolExecutionOptions(ttl_seconds=0)
    with pytest.raises(ValueError, match="estimated_cost_usd"):
        ToolExecutionOptions(estimated_cost_usd=-1)
    # a flag is a bool: the string "false" would turn sharing on
    with pytest.raises(ValueError, match="bounded_read must be True or False, got 'false'"):
        ToolExecutionOptions().replace(bounded_read="false")
    with pytest.raises(ValueError, match="redact takes a list of argument names"):
        ToolExecutionOptions(redact=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"unknown tool option.*ttl_secs.*aliases: ttl, cost"):
        ToolExecutionOptions().replace(ttl_secs=5)
    # ttl= and cost= are aliases, never both names at once
    aliased = ToolExecutionOptions().replace(ttl=5, cost=0.25)
    assert (aliased.ttl_seconds, aliased.estimated_cost_usd) == (5, 0.25)
    with pytest.raises(TypeError, match="pass ttl= or ttl_seconds=, not both"):
        ToolExecutionOptions().replace(ttl=5, ttl_seconds=6)
    # the mode and the record command belong to the run, not to a tool
    for name in ("mode", "record_command"):
        with pytest.raises(TypeError, match=rf"{name}= is not a tool option: it belongs to the run"):
            ToolExecutionOptions().replace(**{name: "record"})


def test_closures_and_lambdas_need_a_tool_name(sf: Singleflight) -> None:
    def make_search(index: str):  # type: ignore[no-untyped-def]
        def search(query: str) -> str:
            return f"{index}:{query}"
        return search

    with pytest.raises(TypeError, match=r"closure.*tool_name="):
        sf.tool(deterministic=True)(make_search("docs"))
    with pytest.raises(TypeError, match=r"lambda.*tool_name="):
        sf.execute_sync(lambda q: q, "x", options=ToolExecutionOptions(deterministic=True))
    class Index:
        def __init__(self, name: str) -> None:
            self.name = name

        def search(self, query: str) -> str:
            return f"{self.name}:{query}"

    with pytest.raises(TypeError, match=r"bound method.*tool_name="):
        sf.execute_sync(Index("a").search, "q", options=ToolExecutionOptions(deterministic=True))
    docs = sf.tool(tool_name="search.docs", deterministic=True)(make_search("docs"))
    tickets = sf.tool(tool_name="search.tickets", deterministic=True)(make_search("tickets"))
    assert (docs("refund"), tickets("refund")) == ("docs:refund", "tickets:refund")
    # unshared tools need no unique name: they are never shared
    assert sf.execute_sync(lambda q: q, "x").source is Source.EXECUTED_UNSHARED


async def test_an_async_caller_of_a_slow_sync_tool_does_not_run_it_twice(sf: Singleflight) -> None:
    runs = 0

    def slow(x: int) -> int:
        nonlocal runs
        runs += 1
        threading.Event().wait(0.5)  # simulated work, longer than the wait timeout
        return x

    options = SHARED.replace(wait_timeout_seconds=0.1)
    outcome = await sf.execute(slow, 1, options=options)
    assert (outcome.source, runs) == (Source.EXECUTED, 1)


def _waiting_on_a_flight(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked on a future (an in-process flight)."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name in ("result", "wait") and "concurrent" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_an_interrupted_owner_hands_over_instead_of_interrupting_waiters(sf: Singleflight) -> None:
    entered, release = threading.Event(), threading.Event()
    runs = 0

    def tool(x: int) -> int:
        nonlocal runs
        runs += 1
        if runs == 1:
            entered.set()
            assert release.wait(10)
            raise SystemExit("owner interrupted")
        return x

    outcomes: list[object] = []

    def owner() -> None:
        with contextlib.suppress(SystemExit):
            sf.execute_sync(tool, 3, options=SHARED)

    def waiter() -> None:
        try:
            outcomes.append(sf.execute_sync(tool, 3, options=SHARED).value)
        except BaseException as exc:
            outcomes.append(exc)

    first = threading.Thread(target=owner)
    first.start()
    assert entered.wait(10)
    waiters = [threading.Thread(target=waiter) for _ in range(3)]
    for thread in waiters:
        thread.start()
    _wait_until(lambda: all(_waiting_on_a_flight(t) for t in waiters))
    release.set()
    for thread in [first, *waiters]:
        thread.join(10)
    assert outcomes == [3, 3, 3]
    assert runs == 2


def test_a_tools_stop_iteration_reaches_the_caller_unchanged(sf: Singleflight) -> None:
    def tool(x: int) -> int:
        raise StopIteration("done")

    with pytest.raises(StopIteration, match="done"):
        sf.execute_sync(tool, 1, options=SHARED)
    with pytest.raises(StopIteration, match="done"):
        sf.execute_sync(tool, 1, options=SHARED.replace(deterministic=False))


@pytest.mark.skipif(platform_lock() is None, reason="no liveness lock here: no lock directory to break")
def test_a_failing_store_falls_back_to_executing(sqlite_sf: Singleflight, db_path: Path) -> None:
    sf = sqlite_sf
    import shutil

    assert sf.execute_sync(str.upper, "b", options=SHARED).source is Source.EXECUTED  # opens it
    shutil.rmtree(f"{db_path}.locks")
    Path(f"{db_path}.locks").write_text("")  # a file where the lock directory goes
    with pytest.warns(RuntimeWarning, match=r"store failed: cannot make the lock directory .*"
                                            r"move that file away"):
        outcome = sf.execute_sync(str.upper, "a", options=SHARED)
    assert (outcome.value, outcome.source) == ("A", Source.EXECUTED_FALLBACK)
    assert sf.summary()["fallbacks"] == 1


def test_results_with_lone_surrogates_are_stored(sf: Singleflight) -> None:
    name = os.fsdecode(b"report-\xff.txt")  # what os.listdir returns for undecodable bytes
    assert sf.execute_sync(lambda: [name], options=SHARED.replace(tool_name="t.ls")).value == [name]
    hit = sf.execute_sync(lambda: [name], options=SHARED.replace(tool_name="t.ls"))
    assert (hit.source, hit.value) == (Source.CACHE_HIT, [name])


def test_counts_are_kept_when_an_engine_is_dropped_without_close(db_path: Path) -> None:
    import gc

    engine = Singleflight(db_path, run_id="dropped")
    for _ in range(10):
        engine.execute_sync(str.upper, "a", options=SHARED)
    del engine
    gc.collect()
    with Singleflight(db_path) as reader:
        assert reader.summary("dropped")["calls"] == 10


def test_a_tool_calling_itself_with_the_same_arguments_does_not_wait_for_itself(
        sf: Singleflight) -> None:
    options = SHARED.replace(tool_name="t.recursive", wait_timeout_seconds=30)
    depth = []

    def recursive(x: int) -> int:
        depth.append(x)
        if len(depth) == 1:
            return sf.execute_sync(recursive, x, options=options).value + 1
        return x

    with pytest.warns(RuntimeWarning, match="called again"):
        assert sf.execute_sync(recursive, 1, options=options).value == 2
    assert len(depth) == 2


async def test_an_async_tool_calling_itself_does_not_wait_for_itself(sf: Singleflight) -> None:
    options = SHARED.replace(tool_name="t.recursive_async", wait_timeout_seconds=30)
    depth = []

    async def recursive(x: int) -> int:
        depth.append(x)
        if len(depth) == 1:
            return (await sf.execute(recursive, x, options=options)).value + 1
        return x

    with pytest.warns(RuntimeWarning, match="called again"):
        assert (await sf.execute(recursive, 1, options=options)).value == 2
