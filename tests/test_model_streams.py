"""Streamed model turns where they break, stop early or outlive their consumer, beyond the basics
of test_model_openai.py (section 6) and test_model_langchain.py: a stream that fails or ends
without ``response.completed`` is never stored and reaches every caller after its events; a turn
complete at ``response.completed`` is recorded whatever happens to its transport afterwards;
cancellation stays cancellation. LangChain: what a wrapped model streams.

No sleeps synchronise anything: tasks meet on events (``asyncio.sleep(0)`` in a fake transport
is one loop turn of simulated I/O, not a wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from _fake_models import (
    FINAL,
    GATE,
    KW,
    NAME,
    TOOL,
    Streamer,
    StreamingChat,
    ToolCalls,
    collect,
    direct_args,
    live_events,
    receipts,
    stop_at_completed,
)
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message
from conftest import SECRET, SpyEngine
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from openai.types.responses import ResponseFailedEvent

from singleflight_agents import Singleflight
from singleflight_agents.adapters import receipt_chat_model
from singleflight_agents.adapters.openai_models import IncompleteStreamError, receipt_model

# == the Agents SDK: streams that break ==============================================================


async def test_a_stream_that_ends_in_response_failed_is_not_stored(sf: Singleflight) -> None:
    created = (await live_events([assistant_message("x")]))[0]
    failed = ResponseFailedEvent(type="response.failed", sequence_number=1,
                                 response=created.response.model_copy(update={"status": "failed"}))

    async def failing(call: ModelCall) -> AsyncIterator[Any]:
        yield created
        yield failed

    inner = ScriptedModel([ModelStep.stream(failing), [assistant_message("recovered")]])
    model = receipt_model(sf, inner, model_name=NAME, deterministic=True)
    first: list[str] = []
    incomplete = r"without response\.completed \(last: response\.failed\)"
    with pytest.raises(IncompleteStreamError, match=incomplete):
        async for event in model.stream_response(*direct_args(), **KW):
            first.append(event.type)
    assert first == ["response.created", "response.failed"]  # delivered, then the error
    second = [e.type for e in await collect(model.stream_response(*direct_args(), **KW))]
    assert len(inner.calls) == 2 and second[-1] == "response.completed"


@pytest.mark.parametrize("breaks", ["raises", "ends"], ids=["error", "incomplete"])
async def test_a_broken_stream_reaches_the_owner_after_its_events_and_every_waiter(
        spy: SpyEngine, breaks: str) -> None:
    """An error in the middle of a stream, or a stream that ends without response.completed."""
    events = await live_events([assistant_message(FINAL)])
    release = asyncio.Event()

    async def broken() -> AsyncIterator[Any]:
        yield events[0]
        await release.wait()
        if breaks == "raises":
            raise ConnectionError("stream reset by peer")

    owner_inner, waiter_inner = Streamer(broken), Streamer(broken)
    owner = receipt_model(spy, owner_inner, model_name=NAME, deterministic=True)
    waiters = [receipt_model(spy, waiter_inner, model_name=NAME, deterministic=True) for _ in range(2)]
    received: list[str] = []

    async def consume_owner() -> None:
        async for event in owner.stream_response(*direct_args(), **KW):
            received.append(event.type)

    owned = asyncio.ensure_future(consume_owner())
    waiting = [asyncio.ensure_future(collect(w.stream_response(*direct_args(), **KW))) for w in waiters]
    await asyncio.wait_for(spy.reached(3).wait(), GATE)  # both waiters wait on the owner's turn
    release.set()
    results = await asyncio.wait_for(asyncio.gather(owned, *waiting, return_exceptions=True), GATE)
    expected = ConnectionError if breaks == "raises" else IncompleteStreamError
    assert [type(r) for r in results] == [expected] * 3
    assert received == ["response.created"]  # the owner's consumer got what streamed first
    assert (owner_inner.calls, waiter_inner.calls) == (1, 0)
    assert receipts(spy) == []
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()] == []

    later = ScriptedModel([[assistant_message(FINAL)]])
    recorded = await collect(receipt_model(spy, later, model_name=NAME, deterministic=True)
                             .stream_response(*direct_args(), **KW))
    assert recorded[-1].type == "response.completed" and len(later.calls) == 1
    row = spy.summary()["tools"][TOOL]
    assert (row["calls"], row["failures"], row["executed"], row["shared_waits"]) == (4, 1, 1, 0)


# == the Agents SDK: a turn complete at response.completed ============================================


async def test_a_consumer_that_stops_at_response_completed_still_records_the_turn(sf: Singleflight) -> None:
    events = await live_events([assistant_message("hi")])
    closed = asyncio.Event()  # the transport closes after the terminal event

    async def stream(call: ModelCall) -> AsyncIterator[Any]:
        for event in events:
            yield event
        await closed.wait()

    inner = ScriptedModel([ModelStep.stream(stream), ModelStep.stream(stream)])
    model = receipt_model(sf, inner, model_name=NAME, deterministic=True)
    for _ in range(2):
        async with contextlib.aclosing(model.stream_response(*direct_args(), **KW)) as received:
            async for event in received:
                if event.type == "response.completed":  # all a consumer needs
                    closed.set()
                    break
    assert len(inner.calls) == 1


async def test_events_of_a_type_the_openai_library_does_not_know_replay_as_recorded(
        sf: Singleflight) -> None:
    """A provider's own event (or a newer one) and an event the model yields as a dict come
    back on a hit as the owner saw them, instead of failing every replay of the turn."""
    events = await live_events([assistant_message("hi")])
    vendor = {"type": "x.vendor.keepalive", "sequence_number": 99}
    as_dict = events[0].model_dump(mode="json", exclude_unset=True, by_alias=True)
    streamed = [as_dict, *events[1:-1], vendor, events[-1]]

    async def stream(call: ModelCall) -> AsyncIterator[Any]:
        for event in streamed:
            yield event

    inner = ScriptedModel([ModelStep.stream(stream)])
    model = receipt_model(sf, inner, model_name=NAME, deterministic=True)
    live = await collect(model.stream_response(*direct_args(), **KW))
    hit = await collect(model.stream_response(*direct_args(), **KW))
    assert len(inner.calls) == 1
    shape = [(type(e).__name__, e["type"] if isinstance(e, dict) else e.type) for e in live]
    assert [(type(e).__name__, e["type"] if isinstance(e, dict) else e.type) for e in hit] == shape
    assert hit[0] == as_dict and hit[-2] == vendor


def test_a_turn_left_finishing_when_asyncio_run_ends_is_still_recorded(tmp_path: Path) -> None:
    events = asyncio.run(live_events([assistant_message("hi")]))
    with Singleflight(tmp_path / "receipts.db", secret=SECRET) as engine:

        async def main() -> None:
            closed = asyncio.Event()

            async def transport() -> AsyncIterator[Any]:
                for event in events:
                    yield event
                await closed.wait()  # the server closes the connection after the terminal event,
                await asyncio.sleep(0)  # and its EOF is read one loop turn later

            model = receipt_model(engine, Streamer(transport), model_name=NAME, deterministic=True)
            await stop_at_completed(model, closed.set)

        asyncio.run(main())  # a script whose last step is the streamed turn
        assert len(receipts(engine)) == 1


def test_a_turn_left_finishing_on_a_closed_loop_does_not_keep_its_lease(tmp_path: Path) -> None:
    events = asyncio.run(live_events([assistant_message("hi")]))
    options: dict[str, Any] = {"model_name": NAME, "deterministic": True, "lease_seconds": 30.0,
                               "wait_timeout_seconds": 0.5}

    async def transport() -> AsyncIterator[Any]:
        for event in events:
            yield event
        await asyncio.Event().wait()  # closes later: the loop is gone by then

    async def complete() -> AsyncIterator[Any]:
        for event in events:
            yield event

    engine = Singleflight(tmp_path / "receipts.db", secret=SECRET)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(stop_at_completed(receipt_model(engine, Streamer(transport), **options)))
    finally:
        loop.close()
    try:
        async def again() -> list[str]:
            model = receipt_model(engine, Streamer(complete), **options)
            return [event.type async for event in model.stream_response(*direct_args(), **KW)]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert asyncio.run(again())[-1] == "response.completed"
        assert [str(w.message) for w in caught if "timed out" in str(w.message)] == []
    finally:
        engine.close()


async def test_a_background_turn_that_fails_after_completed_is_quiet_and_not_kept(
        sqlite_sf: Singleflight) -> None:
    """The turn is recorded at response.completed and the transport closed there: its later
    error never surfaces (no 'Task exception was never retrieved'), nothing is left running."""
    events = await live_events([assistant_message("hi")])
    closed = asyncio.Event()

    async def transport() -> AsyncIterator[Any]:
        for event in events:
            yield event
        await closed.wait()
        raise ConnectionError("reset after the terminal event")

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        model = receipt_model(sqlite_sf, Streamer(transport), model_name=NAME, deterministic=True)
        await stop_at_completed(model)
        closed.set()
        gc.collect()
        assert reported == []
        assert sqlite_sf.summary()["tools"][f"model:{NAME}"]["executed"] == 1
    finally:
        loop.set_exception_handler(previous)


# == the Agents SDK: cancellation ======================================================================


async def test_a_consumer_cancelled_while_its_abandoned_turn_winds_down_stays_cancelled(
        sqlite_sf: Singleflight) -> None:
    events = await live_events([assistant_message("hi")])
    cleaning, cleaned = asyncio.Event(), asyncio.Event()

    async def transport() -> AsyncIterator[Any]:
        yield events[0]
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await cleaned.wait()  # closing the connection takes a moment
            raise

    model = receipt_model(sqlite_sf, Streamer(transport), model_name=NAME, deterministic=True)

    async def consume() -> str:
        async with contextlib.aclosing(model.stream_response(*direct_args(), **KW)) as stream:
            async for _ in stream:
                break  # stops at response.created: the turn is cancelled
        return "carried on"

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(cleaning.wait(), GATE)
    task.cancel()  # e.g. a timeout or a TaskGroup, while the finally block awaits the turn
    cleaned.set()
    await asyncio.wait({task}, timeout=GATE)
    assert task.cancelled(), task.result()


# == LangChain: what a wrapped chat model streams =====================================================


def test_a_wrapped_streaming_model_still_streams_message_chunks(sf: Singleflight) -> None:
    unwrapped = list(StreamingChat().stream("Weather in Oslo?"))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in unwrapped)
    chunks = list(receipt_chat_model(sf, StreamingChat(), deterministic=True).stream("Weather in Oslo?"))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks), [type(c) for c in chunks]
    gathered = chunks[0]
    for chunk in chunks[1:]:
        gathered = gathered + chunk
    assert [c["name"] for c in gathered.tool_call_chunks] == ["weather"]


def test_a_wrapped_model_streams_one_whole_chunk_with_its_tool_calls(sf: Singleflight) -> None:
    chunks = list(receipt_chat_model(sf, ToolCalls(), deterministic=True).stream("Weather?"))
    assert chunks[0].tool_calls == [{"name": "weather", "args": {"city": "Oslo"}, "id": "c1",
                                     "type": "tool_call"}]
    assert [call["args"] for call in chunks[0].invalid_tool_calls] == ['{"city": "Berg']


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def last_message_streaming(model: BaseChatModel) -> AIMessage:
    """One agent step in a LangGraph graph streamed with stream_mode="messages" (token streaming to
    a UI or an eval log), which attaches a streaming callback handler to the model's run."""
    graph = StateGraph(State)
    graph.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_edge(START, "agent")
    graph.add_edge("agent", END)
    final: dict[str, Any] = {}
    for mode, chunk in graph.compile().stream({"messages": [HumanMessage("Weather?")]},
                                              stream_mode=["messages", "values"]):
        if mode == "values":
            final = chunk
    message = final["messages"][-1]
    assert isinstance(message, AIMessage)
    return message


def test_langgraph_messages_streaming_keeps_invalid_tool_calls_invalid(sf: Singleflight) -> None:
    unwrapped = last_message_streaming(ToolCalls())
    assert [call["args"] for call in unwrapped.invalid_tool_calls] == ['{"city": "Berg']
    wrapped = last_message_streaming(receipt_chat_model(sf, ToolCalls(), deterministic=True))
    assert wrapped.tool_calls == unwrapped.tool_calls
    assert wrapped.invalid_tool_calls == unwrapped.invalid_tool_calls
