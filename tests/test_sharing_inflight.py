"""Issue 13, item 5: callers of one flight never share an object. Each waiter gets a copy of
its own (decoded from the receipt's encoded form, or deep-copied); a result that can be used
only once (an awaitable, an iterator, a generator) is neither stored nor handed to a second
caller: each caller runs the tool itself, as a fallback with a warning naming the tool."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pydantic
import pytest
from conftest import joined_after, run_together

from singleflight_agents import ExecutionOutcome, Singleflight, Source, ToolExecutionOptions
from singleflight_agents.store import Lease

SHARED = ToolExecutionOptions(tool_name="t.sharing", deterministic=True)
ENTRIES = ["threads-sync-tool", "threads-async-tool", "tasks-async-tool", "tasks-sync-tool"]


class Answer(pydantic.BaseModel):
    query: str
    hits: list[int]


class Held:
    """What cannot be copied: it holds a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


class Flight:
    """``n`` callers of one tool at once, the tool held until every caller joined its flight;
    ``runs`` counts the tool's executions."""

    def __init__(self, sf: Singleflight, monkeypatch: pytest.MonkeyPatch,
                 produce: Callable[[], Any], options: ToolExecutionOptions = SHARED) -> None:
        self.sf, self.produce, self.options = sf, produce, options
        self.monkeypatch = monkeypatch
        self.runs = 0
        self.release = threading.Event()

    def sync_tool(self, query: str) -> Any:
        self.runs += 1
        assert self.release.wait(30)
        return self.produce()

    async def async_tool(self, query: str) -> Any:
        self.runs += 1
        await asyncio.to_thread(self.release.wait, 30)
        return self.produce()

    def run(self, entry: str, n: int = 2) -> list[ExecutionOutcome]:
        """``entry``: threads (sync entry) or tasks (async entry), and the tool's kind."""
        joined = joined_after(self.monkeypatch, n)
        tool = self.async_tool if entry.endswith("async-tool") else self.sync_tool
        if entry.startswith("threads"):
            return self._threads(tool, n, joined)
        return asyncio.run(self._tasks(tool, n, joined))

    def _threads(self, tool: Callable[..., Any], n: int,
                 joined: threading.Event) -> list[ExecutionOutcome]:
        outcomes: list[ExecutionOutcome] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                outcomes.append(self.sf.execute_sync(tool, "q", options=self.options))
            except BaseException as exc:
                errors.append(exc)

        run_together(call, n, joined, self.release)
        assert not errors, errors
        return outcomes

    async def _tasks(self, tool: Callable[..., Any], n: int,
                     joined: threading.Event) -> list[ExecutionOutcome]:
        tasks = [asyncio.create_task(self.sf.execute(tool, "q", options=self.options))
                 for _ in range(n)]
        await asyncio.to_thread(joined.wait, 30)
        self.release.set()
        return list(await asyncio.gather(*tasks))


def _own_and_equal(outcomes: list[ExecutionOutcome]) -> None:
    """Every caller holds an object of its own, equal to every other's."""
    values = [o.value for o in outcomes]
    assert len({id(v) for v in values}) == len(values)
    assert all(v == values[0] for v in values)


# -- values that can be copied: one run, a copy for each caller ----------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_stored_list_reaches_each_caller_as_its_own_copy(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    flight = Flight(sf, monkeypatch, lambda: [{"hit": 1}, {"hit": 2}])
    outcomes = flight.run(entry, n=3)
    assert flight.runs == 1
    assert sorted(o.source for o in outcomes) == sorted(
        [Source.EXECUTED, Source.SHARED_WAIT, Source.SHARED_WAIT])
    _own_and_equal(outcomes)
    outcomes[0].value[0]["hit"] = 99  # nested objects are not shared either
    assert outcomes[1].value[0]["hit"] == outcomes[2].value[0]["hit"] == 1


@pytest.mark.filterwarnings("ignore:.*not persisted")
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_pydantic_model_reaches_each_caller_as_its_own_copy(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    flight = Flight(sf, monkeypatch, lambda: Answer(query="q", hits=[1, 2]))
    outcomes = flight.run(entry, n=3)
    assert flight.runs == 1
    assert sorted(o.source for o in outcomes) == sorted(
        [Source.EXECUTED, Source.SHARED_WAIT, Source.SHARED_WAIT])
    _own_and_equal(outcomes)
    assert all(type(o.value) is Answer for o in outcomes)
    owner = next(o.value for o in outcomes if o.source is Source.EXECUTED)
    owner.hits.append(3)  # the owner changing its model changes no waiter's
    assert [o.value.hits for o in outcomes if o.value is not owner] == [[1, 2], [1, 2]]


@pytest.mark.filterwarnings("ignore:.*not persisted")
def test_a_langgraph_command_reaches_each_caller_as_its_own_copy(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    types = pytest.importorskip("langgraph.types")
    flight = Flight(sf, monkeypatch, lambda: types.Command(update={"notes": ["found"]}))
    outcomes = flight.run("threads-sync-tool")
    assert flight.runs == 1
    _own_and_equal(outcomes)
    first, second = (o.value for o in outcomes)
    assert first.update is not second.update
    assert first.update["notes"] is not second.update["notes"]


# -- values used once: never stored, never handed on; each caller runs the tool ------------


async def _answer() -> list[int]:
    return [1, 2]


async def _async_items() -> AsyncIterator[int]:
    for i in (1, 2):
        yield i


def _items() -> Iterator[int]:
    yield from (1, 2)


def _single_use_outcomes(flight: Flight, entry: str) -> list[ExecutionOutcome]:
    with pytest.warns(RuntimeWarning, match=r"t\.sharing: its result \(of type \w+\) can be "
                                            r"used only once: it was not persisted, nor shared"):
        outcomes = flight.run(entry)
    assert flight.runs == 2  # one run per caller
    assert sorted(o.source for o in outcomes) == sorted(
        [Source.EXECUTED, Source.EXECUTED_FALLBACK])
    values = [o.value for o in outcomes]
    assert values[0] is not values[1]
    summary = flight.sf.summary()
    assert (summary["fallbacks"], summary["not_persisted"], summary["shared_waits"]) == (1, 1, 0)
    # nothing stored, and the lease given back: another process would run it at once
    assert list(flight.sf.store.iter_receipts()) == []
    lease = flight.sf.store.acquire(outcomes[0].fingerprint, "another-process", 10)
    assert isinstance(lease, Lease)
    flight.sf.store.release(lease)
    return outcomes


@pytest.mark.parametrize("entry", ["threads-async-tool", "tasks-async-tool"])
def test_a_returned_coroutine_is_each_callers_own(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    # An async tool that returns a coroutine unawaited: awaiting one twice would raise
    # "cannot reuse already awaited coroutine".
    outcomes = _single_use_outcomes(Flight(sf, monkeypatch, _answer), entry)

    async def await_each() -> list[Any]:
        return [await o.value for o in outcomes]

    assert asyncio.run(await_each()) == [[1, 2], [1, 2]]


@pytest.mark.parametrize("entry", ["threads-sync-tool", "tasks-sync-tool"])
def test_a_sync_tools_coroutine_runs_to_its_end_and_its_value_is_shared(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    # A sync callable that hands back a coroutine (a wrapper, a lambda) runs it to its end:
    # its value, not the coroutine, is the result, shared as any other.
    flight = Flight(sf, monkeypatch, _answer)
    outcomes = flight.run(entry)
    assert flight.runs == 1
    assert sorted(o.source for o in outcomes) == sorted([Source.EXECUTED, Source.SHARED_WAIT])
    _own_and_equal(outcomes)
    assert outcomes[0].value == [1, 2]


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_returned_generator_is_each_callers_own(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    outcomes = _single_use_outcomes(Flight(sf, monkeypatch, _items), entry)
    assert [list(o.value) for o in outcomes] == [[1, 2], [1, 2]]  # neither got part


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_returned_async_generator_is_each_callers_own(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    outcomes = _single_use_outcomes(Flight(sf, monkeypatch, _async_items), entry)

    async def drain() -> list[list[int]]:
        return [[i async for i in o.value] for o in outcomes]

    assert asyncio.run(drain()) == [[1, 2], [1, 2]]


def test_an_iterator_that_pickles_is_still_never_stored(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    pickled = SHARED.replace(allow_pickle=True)
    flight = Flight(sf, monkeypatch, lambda: iter([1, 2]), options=pickled)
    outcomes = _single_use_outcomes(flight, "threads-sync-tool")
    assert [list(o.value) for o in outcomes] == [[1, 2], [1, 2]]
    flight.release.set()
    later = sf.execute_sync(flight.sync_tool, "q", options=pickled)
    assert later.source is Source.EXECUTED and list(later.value) == [1, 2]
    assert flight.runs == 3


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_result_that_cannot_be_copied_is_not_shared(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    flight = Flight(sf, monkeypatch, Held)
    with pytest.warns(RuntimeWarning) as caught:
        outcomes = flight.run(entry)
    messages = [str(w.message) for w in caught]
    # the owner's line (not stored), and the waiter's own (why it ran the tool itself)
    assert any(m.startswith("t.sharing: result of type") and "not persisted" in m
               for m in messages), messages
    assert any(m.startswith("t.sharing: executing without sharing because its result (of type "
                            "Held) cannot be copied for another caller (TypeError")
               for m in messages), messages
    assert flight.runs == 2
    assert sorted(o.source for o in outcomes) == sorted(
        [Source.EXECUTED, Source.EXECUTED_FALLBACK])
    assert outcomes[0].value is not outcomes[1].value
    assert sf.summary()["fallbacks"] == 1


# -- do(): the same rule ------------------------------------------------------------------


@pytest.mark.parametrize("produce", [lambda: {"hits": [1, 2]}, lambda: Answer(query="q", hits=[1])],
                         ids=["stored", "not-stored"])
@pytest.mark.filterwarnings("ignore:.*not persisted")
async def test_do_gives_each_task_its_own_value(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch, produce: Callable[[], Any]) -> None:
    joined, release, runs = joined_after(monkeypatch, 3), asyncio.Event(), [0]

    async def fn() -> Any:
        runs[0] += 1
        await release.wait()
        return produce()

    async def releaser() -> None:
        await asyncio.to_thread(joined.wait, 30)
        release.set()

    outcomes = (await asyncio.gather(releaser(), *(sf.do("t.do", {"q": 1}, fn, options=SHARED)
                                                   for _ in range(3))))[1:]
    assert runs == [1]
    _own_and_equal(outcomes)


def test_do_sync_never_hands_a_generator_to_a_second_thread(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    joined, release, runs = joined_after(monkeypatch, 2), threading.Event(), [0]
    outcomes: list[ExecutionOutcome] = []

    def fn() -> Iterator[int]:
        runs[0] += 1
        assert release.wait(30)
        return _items()

    with pytest.warns(RuntimeWarning, match=r"t\.do: its result \(of type generator\)"):
        run_together(lambda: outcomes.append(sf.do_sync("t.do", 1, fn, options=SHARED)), 2,
                     joined, release)
    assert runs == [2]
    assert [list(o.value) for o in outcomes] == [[1, 2], [1, 2]]
