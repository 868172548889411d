"""A shared tool's or node's custom stream events: written live by the run that executes it,
stored with its result, and written again for every caller it serves (a receipt hit, an
in-flight waiter), so each looks to the graph like a run of its own."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.config import get_stream_writer
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, ToolRuntime
from langgraph.types import StreamWriter

from singleflight_agents import Singleflight
from singleflight_agents._flow import FLIGHTS
from singleflight_agents.adapters import (
    wrap_langchain_tool,
    wrap_langchain_tools,
    wrap_langgraph_node,
)

RUNS: Counter[str] = Counter()
EVENTS = [{"step": "foo"}, {"step": "bar"}, {"step": "baz"}]


@pytest.fixture(autouse=True)
def _reset_runs() -> None:
    RUNS.clear()


@tool
def streaming_tool(x: int) -> str:
    """Write progress to the custom stream."""
    RUNS["streaming_tool"] += 1
    writer = get_stream_writer()
    for event in EVENTS:
        writer(event)
    return str(x)


@tool
async def runtime_tool(x: int, runtime: ToolRuntime) -> str:
    """Write to the stream through the injected runtime."""
    RUNS["runtime_tool"] += 1
    runtime.stream_writer({"x": x})
    return str(x * 2)


def _tool_graph(tools: list[Any]) -> Any:
    return StateGraph(MessagesState).add_node("tools", ToolNode(tools)) \
        .add_edge(START, "tools").compile()


def _call(name: str, call_id: str) -> dict[str, Any]:
    call = {"name": name, "args": {"x": 1}, "id": call_id, "type": "tool_call"}
    return {"messages": [AIMessage("", tool_calls=[call])]}


def _custom(chunks: list[Any]) -> list[Any]:
    return [chunk for mode, chunk in chunks if mode == "custom"]


def test_a_receipt_hit_writes_the_tools_events_again(sqlite_sf: Singleflight,
                                                     db_path: Path) -> None:
    graph = _tool_graph(wrap_langchain_tools(sqlite_sf, [streaming_tool], deterministic=True))
    first = list(graph.stream(_call("streaming_tool", "1"), stream_mode=["custom", "updates"]))
    second = list(graph.stream(_call("streaming_tool", "2"), stream_mode=["custom", "updates"]))
    assert RUNS["streaming_tool"] == 1
    assert _custom(first) == _custom(second) == EVENTS  # once each: the owner's not doubled
    assert [mode for mode, _ in second] == ["custom"] * 3 + ["updates"]  # before the answer
    answer = second[-1][1]["tools"]["messages"][0]
    assert isinstance(answer, ToolMessage) and answer.tool_call_id == "2"
    with Singleflight(db_path) as other:  # another engine: the events come from the store
        again = _tool_graph(wrap_langchain_tools(other, [streaming_tool], deterministic=True))
        assert list(again.stream(_call("streaming_tool", "3"), stream_mode="custom")) == EVENTS
    assert RUNS["streaming_tool"] == 1


def test_events_written_while_not_streaming_are_replayed_to_a_stream(
        sqlite_sf: Singleflight) -> None:
    graph = _tool_graph(wrap_langchain_tools(sqlite_sf, [streaming_tool], deterministic=True))
    graph.invoke(_call("streaming_tool", "1"))  # the run's writer discards them
    assert list(graph.stream(_call("streaming_tool", "2"), stream_mode="custom")) == EVENTS
    assert RUNS["streaming_tool"] == 1


async def test_a_runtime_stream_writer_is_recorded_and_replayed(sqlite_sf: Singleflight) -> None:
    graph = _tool_graph(wrap_langchain_tools(sqlite_sf, [runtime_tool], deterministic=True))
    for _ in range(2):  # the runtime's state is keyed: the same call, the same state
        chunks = [c async for c in graph.astream(_call("runtime_tool", "1"),
                                                 stream_mode="custom")]
        assert chunks == [{"x": 1}]
    assert RUNS["runtime_tool"] == 1


def test_unshared_tools_write_their_events_once_per_run(sqlite_sf: Singleflight) -> None:
    graph = _tool_graph(wrap_langchain_tools(sqlite_sf, [streaming_tool]))
    for call_id in ("1", "2"):
        assert list(graph.stream(_call("streaming_tool", call_id), stream_mode="custom")) == EVENTS
    assert RUNS["streaming_tool"] == 2


class Query(TypedDict):
    q: str
    answer: str


def writing_node(state: Query, writer: StreamWriter) -> dict[str, Any]:
    RUNS["node"] += 1
    writer({"node": state["q"]})
    get_stream_writer()({"again": state["q"]})
    return {"answer": state["q"].upper()}


def _node_graph(node: Any) -> Any:
    return StateGraph(Query).add_node("n", node).add_edge(START, "n").compile()


def test_a_shared_nodes_events_are_replayed_through_its_writer(sqlite_sf: Singleflight) -> None:
    graph = _node_graph(wrap_langgraph_node(sqlite_sf, writing_node, deterministic=True))
    for _ in range(2):
        assert list(graph.stream({"q": "a"}, stream_mode="custom")) == [{"node": "a"},
                                                                         {"again": "a"}]
    assert RUNS["node"] == 1


def test_an_in_flight_waiter_writes_the_owners_events(sqlite_sf: Singleflight,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    joined, entered = threading.Event(), threading.Event()
    join = FLIGHTS.join

    def watched_join(key: tuple[str, str]) -> Any:
        flight, owner = join(key)
        if not owner:
            joined.set()
        return flight, owner

    monkeypatch.setattr(FLIGHTS, "join", watched_join)

    @tool
    def held(x: int) -> str:
        """Write an event, then wait until a second caller waits on this run."""
        RUNS["held"] += 1
        get_stream_writer()({"held": x})
        entered.set()
        assert joined.wait(10), "the second caller never joined the flight"
        return str(x)

    graph = _tool_graph([wrap_langchain_tool(sqlite_sf, held, deterministic=True,
                                             tool_name="tests.held")])
    streams: dict[str, list[Any]] = {}

    def run(call_id: str) -> None:
        streams[call_id] = list(graph.stream(_call("held", call_id), stream_mode="custom"))

    owner = threading.Thread(target=run, args=("1",))
    owner.start()
    assert entered.wait(10)
    waiter = threading.Thread(target=run, args=("2",))
    waiter.start()
    owner.join(10)
    waiter.join(10)
    assert streams == {"1": [{"held": 1}], "2": [{"held": 1}]}
    assert RUNS["held"] == 1


def test_a_result_stored_before_events_were_stored_still_serves() -> None:
    from singleflight_agents.adapters.langgraph import _finish, _Invocation

    served = _Invocation(streaming_tool.func, (), {}, call_id="new")  # type: ignore[arg-type]
    old = _finish(served, ("old", {"answer": 1}))  # (call id, result): no events
    assert old == {"answer": 1}
