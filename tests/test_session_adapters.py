"""A replay session governs the adapters' engines: a call with no receipt never runs, and its
miss lands in the open scope even when the framework turns the error into a message.

The app builds its tools and models on its own engine (in record mode, as in production code);
the eval then runs inside ``Session(store, mode="replay")`` with a scope open, as the pytest
plugin does for each test. Each test first records one call with other arguments, so the store
exists and holds a receipt, and checks the session serves it: the miss is the store's answer.
"""

from __future__ import annotations

import asyncio
import importlib
import operator
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from agents import Agent, RunConfig, Runner
from agents.items import ToolCallOutputItem
from agents.testing import ScriptedModel, assistant_message, function_call
from conftest import SECRET
from langchain_core.messages import AIMessage, AnyMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from singleflight_agents import ReplayMissError, Session, Singleflight
from singleflight_agents.adapters import (
    function_tool,
    receipt_model,
    wrap_langchain_tool,
    wrap_langgraph_node,
)

CONFIG = RunConfig(tracing_disabled=True)
RUNS: Counter[str] = Counter()
MISS = "no receipt to replay"


@pytest.fixture(autouse=True)
def _reset_runs() -> None:
    RUNS.clear()


def replay(store_url: str) -> Session:
    return Session(store_url, mode="replay", secret=SECRET)


# -- OpenAI Agents SDK: a function tool, then a model turn ------------------------------------


def weather(city: str) -> str:
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    RUNS[city] += 1
    return f"sunny in {city}"


def tool_outputs(result: Any) -> list[str]:
    return [str(item.output) for item in result.new_items if isinstance(item, ToolCallOutputItem)]


def weather_agent(tool: Any, city: str) -> Agent[Any]:
    model = ScriptedModel([[function_call("weather", {"city": city}, call_id="call-1")],
                           [assistant_message("done")]])
    return Agent(name="weather", model=model, tools=[tool])


async def test_a_function_tool_miss_never_runs_and_is_caught_though_the_sdk_swallows_it(
        sf: Singleflight, store_url: str) -> None:
    tool = function_tool(sf, weather, bounded_read=True)  # the app's engine, in record mode
    recorded = await Runner.run(weather_agent(tool, "Oslo"), "go", run_config=CONFIG)
    assert tool_outputs(recorded) == ["sunny in Oslo"] and RUNS == {"Oslo": 1}

    with replay(store_url) as run, run.scope("t") as scope:
        served = await Runner.run(weather_agent(tool, "Oslo"), "go", run_config=CONFIG)
        missed = await Runner.run(weather_agent(tool, "Bergen"), "go", run_config=CONFIG)
    assert tool_outputs(served) == ["sunny in Oslo"]
    # The SDK turned the miss into a message to the model, and the run went on ...
    assert missed.final_output == "done"
    assert len(tool_outputs(missed)) == 1 and "error occurred" in tool_outputs(missed)[0]
    # ... but the tool never ran, and the scope holds the miss.
    assert RUNS == {"Oslo": 1}
    assert [str(o.source) for o in scope.outcomes] == ["cache_hit"]
    assert len(scope.misses) == 1
    assert scope.misses[0].tool_name == f"{__name__}.weather"  # module.name
    assert '"Bergen"' in str(scope.misses[0])
    assert sf.current_mode() == "record"  # the session has ended
    assert len(list(sf.store.iter_receipts())) == 1  # nothing was recorded in replay


async def test_a_model_turn_miss_never_calls_the_model_and_lands_in_the_scope(
        sf: Singleflight, store_url: str) -> None:
    def agent(model: ScriptedModel, instructions: str) -> Agent[Any]:
        wrapped = receipt_model(sf, model, model_name="scripted", deterministic=True)
        return Agent(name="a", instructions=instructions, model=wrapped)

    recording = ScriptedModel([[assistant_message("hello")]])
    assert (await Runner.run(agent(recording, "Greet."), "hi", run_config=CONFIG)).final_output \
        == "hello"
    empty = ScriptedModel([])  # any call raises
    with replay(store_url) as run, run.scope("t") as scope:
        served = await Runner.run(agent(empty, "Greet."), "hi", run_config=CONFIG)
        with pytest.raises(ReplayMissError, match=rf"^model:scripted: {MISS}"):
            await Runner.run(agent(empty, "Greet in French."), "hi", run_config=CONFIG)
    assert served.final_output == "hello"
    assert (len(recording.calls), len(empty.calls)) == (1, 0)
    assert [str(o.source) for o in scope.outcomes] == ["cache_hit"]
    assert [m.tool_name for m in scope.misses] == ["model:scripted"]


# -- LangGraph: a node, then a LangChain tool in a ToolNode that handles errors ---------------


class FetchState(TypedDict):
    url: str
    pages: Annotated[list[str], operator.add]


def fetch(state: FetchState) -> dict[str, Any]:
    RUNS[state["url"]] += 1
    return {"pages": [state["url"].upper()]}


def test_a_langgraph_node_miss_never_runs_and_lands_in_the_scope(
        sf: Singleflight, store_url: str) -> None:
    builder = StateGraph(FetchState)
    builder.add_node("fetch", wrap_langgraph_node(sf, fetch, key=lambda s: s["url"],
                                                  bounded_read=True))
    builder.add_edge(START, "fetch")
    builder.add_edge("fetch", END)
    graph = builder.compile()
    assert graph.invoke({"url": "a", "pages": []})["pages"] == ["A"]

    with replay(store_url) as run, run.scope("t") as scope:
        assert graph.invoke({"url": "a", "pages": []})["pages"] == ["A"]
        with pytest.raises(ReplayMissError, match=MISS):
            graph.invoke({"url": "b", "pages": []})
    assert RUNS == {"a": 1}
    assert [str(o.source) for o in scope.outcomes] == ["cache_hit"]
    assert [m.tool_name for m in scope.misses] == [f"{__name__}.fetch"]


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@tool
def search(query: str) -> str:
    """Search the help center."""
    RUNS[query] += 1
    return f"found {query}"


@pytest.mark.parametrize("use_async", [False, True], ids=["invoke", "ainvoke"])
def test_a_langchain_tool_miss_never_runs_and_is_caught_though_the_tool_node_swallows_it(
        sf: Singleflight, store_url: str, use_async: bool) -> None:
    builder = StateGraph(AgentState)
    builder.add_node("tools", ToolNode([wrap_langchain_tool(sf, search, bounded_read=True)],
                                       handle_tool_errors=True))
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    graph = builder.compile()

    def ask(query: str) -> ToolMessage:
        call = {"name": "search", "args": {"query": query}, "id": "c1", "type": "tool_call"}
        state: AgentState = {"messages": [AIMessage("", tool_calls=[call])]}
        final = asyncio.run(graph.ainvoke(state)) if use_async else graph.invoke(state)
        message = final["messages"][-1]
        assert isinstance(message, ToolMessage)
        return message

    assert ask("refunds").content == "found refunds"
    with replay(store_url) as run, run.scope("t") as scope:
        served, missed = ask("refunds"), ask("returns")
    assert (served.content, served.status) == ("found refunds", "success")
    # ToolNode made the miss an error message for the model, and the graph went on ...
    assert missed.status == "error" and MISS in str(missed.content)
    # ... but the tool never ran, and the scope holds the miss.
    assert RUNS == {"refunds": 1}
    assert [str(o.source) for o in scope.outcomes] == ["cache_hit"]
    assert [m.tool_name for m in scope.misses] == [f"{__name__}.search"]


# -- the package's name for it -----------------------------------------------------------------


def test_the_package_exports_the_session_function_after_the_engine_loaded(tmp_path: Path) -> None:
    # A submodule named like the function would replace it on the package once imported.
    package = importlib.import_module("singleflight_agents")
    importlib.import_module("singleflight_agents.engine")
    assert callable(package.session) and not isinstance(package.session, type(package))
    store = tmp_path / "receipts.db"
    with package.session(store, mode="off") as run:
        assert isinstance(run, Session) and run.mode == "off"
    assert not store.exists()  # no call was made: the store was never opened
