"""Issue 12, the engine's part: the tool's own TimeoutError, results the codec cannot store,
exceptions whose str() fails, a tool calling itself from tasks it started, failure messages
kept out of the store, and one line at exit when statistics cannot be written."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import joined_after, run_together
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from singleflight_agents import SharedExecutionError, Singleflight, Source, ToolExecutionOptions
from singleflight_agents.fingerprint import make_fingerprint
from singleflight_agents.store import Lease

SHARED = ToolExecutionOptions(tool_name="t.hard", deterministic=True)


def _free(sf: Singleflight, key: str) -> bool:
    """Whether the key's lease was left free (another process could take it at once)."""
    lease = sf.store.acquire(key, "another-process", 10)
    if isinstance(lease, Lease):
        sf.store.release(lease)
        return True
    return False


# -- 2. a tool's TimeoutError is the tool's, shared like any error --------------------------


def test_a_tool_timeout_error_runs_once_for_every_thread(sf: Singleflight,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []
    release = threading.Event()
    joined = joined_after(monkeypatch, 8)

    def tool(query: str) -> str:
        runs.append(query)
        release.wait(30)
        raise TimeoutError("upstream read timed out")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            sf.execute_sync(tool, "q", options=SHARED)
        except TimeoutError as exc:
            errors.append(exc)

    run_together(call, 8, joined, release)
    assert runs == ["q"]
    assert [str(e) for e in errors] == ["upstream read timed out"] * 8


async def test_a_tool_timeout_error_runs_once_for_every_task(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []
    release = asyncio.Event()
    joined = joined_after(monkeypatch, 8)

    async def tool(query: str) -> str:
        runs.append(query)
        await release.wait()
        raise TimeoutError("upstream read timed out")

    async def releaser() -> None:
        await asyncio.to_thread(joined.wait, 30)
        release.set()

    results = await asyncio.gather(releaser(), *(sf.execute(tool, "q", options=SHARED)
                                                 for _ in range(8)), return_exceptions=True)
    assert runs == ["q"]
    assert [type(r) for r in results[1:]] == [TimeoutError] * 8


# -- 3. results the codec cannot store never hold the lease --------------------------------


def _self_referencing() -> list[Any]:
    loop: list[Any] = [1]
    loop.append(loop)
    return loop


def _deep() -> list[Any]:
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    return deep


@pytest.mark.filterwarnings("ignore:.*not persisted")
@pytest.mark.parametrize("make", [lambda: 10 ** 5000, _deep, _self_referencing, lambda: {1j}],
                         ids=["int-of-5001-digits", "nested-10000-deep", "self-referencing",
                              "a-set-of-complex"])
def test_an_unstorable_result_reaches_its_caller_and_frees_the_lease(
        sf: Singleflight, make: Any) -> None:
    value = make()
    outcome = sf.execute_sync(lambda: value, options=SHARED.replace(tool_name="t.unstorable"))
    assert outcome.value is value and outcome.source is Source.EXECUTED
    assert outcome.receipt is None
    assert _free(sf, outcome.fingerprint)
    assert sf.summary()["not_persisted"] == 1


def test_the_warning_for_an_unstorable_result_names_what_happened(sf: Singleflight) -> None:
    with pytest.warns(RuntimeWarning, match=r"t\.huge: result cannot be stored \(ValueError: "
                                            r".*\); the result reached this call's waiters, but "
                                            r"was not persisted"):
        sf.execute_sync(lambda: 10 ** 5000, options=SHARED.replace(tool_name="t.huge"))


# -- 4. an exception whose __str__ fails ---------------------------------------------------


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise AttributeError("no message here")


def test_an_exception_whose_str_fails_reaches_the_caller_and_frees_the_lease(
        sf: Singleflight) -> None:
    def tool(query: str) -> str:
        raise BrokenStr()

    with pytest.raises(BrokenStr):
        sf.execute_sync(tool, "q", options=SHARED)
    assert _free(sf, make_fingerprint("t.hard", {"query": "q"}))


# -- 5. a tool that calls itself from tasks and threads it started --------------------------


def _reason(caught: list[Any]) -> list[str]:
    return [str(w.message) for w in caught if "executing without sharing" in str(w.message)]


async def test_a_tool_calling_itself_from_tasks_it_started_does_not_wait_for_itself(
        sf: Singleflight) -> None:
    options = SHARED.replace(tool_name="t.recursive", wait_timeout_seconds=2)
    runs: list[int] = []

    async def tool(depth: int) -> int:
        runs.append(depth)
        if len(runs) > 1:
            return 0
        async with asyncio.TaskGroup() as group:  # as agent frameworks fan out
            inner = group.create_task(sf.execute(tool, depth, options=options))
        both = await asyncio.gather(sf.execute(tool, depth, options=options),
                                    asyncio.to_thread(sf.execute_sync, tool, depth,
                                                      options=options))
        return 1 + inner.result().value + sum(o.value for o in both)

    with pytest.warns(RuntimeWarning) as caught:
        outcome = await sf.execute(tool, 0, options=options)
    assert outcome.value == 1 and outcome.source is Source.EXECUTED
    assert _reason(caught) == ["t.recursive: executing without sharing because it was called "
                               "again, with the same arguments, by its own run"]


def test_a_sync_tool_calling_itself_through_a_context_copying_thread(sf: Singleflight) -> None:
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    options = SHARED.replace(tool_name="t.pool", wait_timeout_seconds=2)
    runs: list[int] = []

    def tool(depth: int) -> int:
        runs.append(depth)
        if len(runs) > 1:
            return 0
        with ThreadPoolExecutor(2) as pool:  # LangChain's executors copy the context like this
            context = contextvars.copy_context()
            future = pool.submit(context.run, sf.execute_sync, tool, depth, options=options)
            return 1 + future.result().value

    with pytest.warns(RuntimeWarning) as caught:
        assert sf.execute_sync(tool, 0, options=options).value == 1
    assert _reason(caught) == ["t.pool: executing without sharing because it was called again, "
                               "with the same arguments, by its own run"]


# -- 6. a failing tool's message is not stored ---------------------------------------------


def test_a_failure_message_reaches_the_store_only_when_failures_are_shared(
        sf: Singleflight) -> None:
    def tool(query: str) -> str:
        raise PermissionError("401 for https://api.example.com/?key=sk-live-0123456789")

    with pytest.raises(PermissionError):
        sf.execute_sync(tool, "q", options=SHARED.replace(tool_name="t.auth"))
    failure = sf.store.last_failure(make_fingerprint("t.auth", {"query": "q"}))
    assert failure is not None and failure.error_type == "PermissionError"
    assert "sk-live" not in failure.message
    assert str(SharedExecutionError("t.auth", failure.error_type, failure.message)) == (
        "t.auth: shared execution failed with PermissionError (its message stays with the "
        "process that ran it)")
    with pytest.raises(PermissionError):  # share_failures=True: sharing the message is asked for
        sf.execute_sync(tool, "q", options=SHARED.replace(tool_name="t.auth2",
                                                          share_failures=True))
    shared = sf.store.last_failure(make_fingerprint("t.auth2", {"query": "q"}))
    assert shared is not None and shared.message.startswith("401 for")


# -- 13. one line at exit when statistics cannot be written --------------------------------


def test_statistics_that_cannot_be_written_at_exit_are_one_line(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from singleflight_agents import Singleflight, StoreError, ToolExecutionOptions
        from singleflight_agents.store import SQLiteStore

        def disk_full(*args, **kwargs):
            raise StoreError("{tmp_path}/r.db: database or disk is full")

        sf = Singleflight({str(tmp_path / "r.db")!r})
        options = ToolExecutionOptions(tool_name="t.up", deterministic=True)
        sf.execute_sync(str.upper, "a", options=options)  # the first counts are written now
        SQLiteStore.save_stats = disk_full
        sf.execute_sync(str.upper, "a", options=options)  # these wait for the exit
        # no close(): the counts are written at exit, and that fails
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert done.stderr.splitlines() == [
        f"singleflight: statistics not written at exit: {tmp_path}/r.db: database or disk is full"]


# -- properties: whatever the result or the error, the caller gets it and the lease is free --


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


UNSTORABLE = st.one_of(
    st.integers(4301, 6000).map(lambda digits: 10 ** digits),
    st.integers(2000, 12_000).map(_nested),
    st.integers(1, 5).map(lambda n: (lambda loop: loop.append(loop) or loop)(list(range(n)))),
    st.sampled_from([{1j}, object(), threading.Lock()]),
)


class _Broken(Exception):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def __str__(self) -> str:
        if "str" in self.where:
            raise ValueError("str() fails")
        return "fine"

    def __repr__(self) -> str:
        if "repr" in self.where:
            raise ValueError("repr() fails")
        return "_Broken()"


@pytest.mark.filterwarnings("ignore:.*not persisted")
@pytest.mark.filterwarnings("ignore:.*could not be decoded")  # a pickle read without allow_pickle
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=UNSTORABLE, allow_pickle=st.booleans())
def test_property_an_unstorable_result_reaches_its_caller_and_frees_the_lease(
        sqlite_sf: Singleflight, value: Any, allow_pickle: bool) -> None:
    options = SHARED.replace(tool_name="t.prop", allow_pickle=allow_pickle)
    outcome = sqlite_sf.execute_sync(lambda v: value, id(value), options=options)
    assert outcome.value is value or outcome.source is Source.CACHE_HIT
    assert _free(sqlite_sf, outcome.fingerprint)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["str", "repr", "str+repr", "neither"]), share=st.booleans())
def test_property_any_tool_exception_reaches_its_caller_and_frees_the_lease(
        sqlite_sf: Singleflight, where: str, share: bool) -> None:
    def tool(x: str) -> str:
        raise _Broken(where)

    options = SHARED.replace(tool_name=f"t.broken.{where}", share_failures=share)
    with pytest.raises(_Broken):
        sqlite_sf.execute_sync(tool, where, options=options)
    assert _free(sqlite_sf, make_fingerprint(f"t.broken.{where}", {"x": where}))


# -- a third look: what a second hostile review found ----------------------------------------


def test_a_run_id_that_stores_cannot_keep_is_refused_when_built(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from singleflight_agents import session

    with pytest.raises(ValueError, match=r"run id '\\udcff' holds the lone surrogate"):
        Singleflight(tmp_path / "r.db", run_id="\udcff")
    monkeypatch.setenv("SINGLEFLIGHT_RUN_ID", "ok-" + "\udcff")
    with pytest.raises(ValueError, match=r"set \$SINGLEFLIGHT_RUN_ID to plain text"):
        session(tmp_path / "r.db")


def test_statistics_that_cannot_be_written_never_fail_a_call(sqlite_sf: Singleflight,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(type(sqlite_sf.store), "save_stats", broken)
    with pytest.warns(RuntimeWarning, match="statistics not written"):
        assert sqlite_sf.execute_sync(str.upper, "a", options=SHARED).value == "A"


@pytest.mark.parametrize("usage", [(None, None, None), ("a", 1, 1.0), (1, 2, float("nan")),
                                   (1, 2, -15.0), (1, 2, 1e308), (1, 2), "lots"])
def test_a_meter_returning_nonsense_is_warned_about_and_ignored(sqlite_sf: Singleflight,
                                                                usage: Any) -> None:
    options = SHARED.replace(tool_name="t.metered", meter=lambda result: usage)
    with pytest.warns(RuntimeWarning, match=r"t\.metered: its meter failed \(ValueError"):
        assert sqlite_sf.execute_sync(str.upper, "a", options=options).value == "A"
    summary = sqlite_sf.summary()  # still adds up: nothing damaged went into the statistics
    assert summary["calls"] == 1 and summary["dollars_spent"] == 0


async def test_a_sync_callable_that_returns_a_coroutine_is_awaited(sf: Singleflight) -> None:
    import functools

    async def real(x: int) -> int:
        return x * 2

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return real(*args, **kwargs)

    for shared in (SHARED.replace(tool_name="t.wrapped"), ToolExecutionOptions()):
        assert (await sf.execute(wrapper, 5, options=shared)).value == 10
        assert sf.execute_sync(lambda x: real(x), 6, options=shared.replace(
            tool_name=f"{shared.tool_name or 't'}.lambda")).value == 12


class _LoadsBadly:
    def __reduce__(self) -> Any:
        return (_refuse_to_load, ())


def _refuse_to_load() -> None:
    raise ValueError("cannot load")


@pytest.mark.filterwarnings("ignore:.*not persisted")
def test_a_pickle_that_does_not_load_back_reaches_every_caller_and_is_never_stored(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    value = _LoadsBadly()
    joined = joined_after(monkeypatch, 4)
    release = threading.Event()

    def tool(x: int) -> Any:
        release.wait(30)
        return value

    options = SHARED.replace(tool_name="t.badpickle", allow_pickle=True)
    got: list[Any] = []
    run_together(lambda: got.append(sf.execute_sync(tool, 1, options=options).value), 4, joined,
              release)
    assert got == [value] * 4
    assert list(sf.store.iter_receipts()) == []


def test_a_redis_prefix_that_could_reach_another_prefix_is_refused() -> None:
    from singleflight_agents import StoreError, open_store

    for prefix in ("X:r", "a*", "sp ace", "é"):
        with pytest.raises(StoreError, match=r"use letters, digits, '-', '_' or '\.'"):
            open_store(f"redis://127.0.0.1:6379/15?prefix={prefix}")
