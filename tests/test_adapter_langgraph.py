"""The LangGraph / LangChain adapter against the real packages: nodes, Send, ToolNode, tools."""

from __future__ import annotations

import asyncio
import functools
import inspect
import operator
import threading
import time
import typing
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, InjectedToolCallId, StructuredTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import InjectedState, InjectedStore, ToolNode, ToolRuntime, tools_condition
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore
from langgraph.store.memory import InMemoryStore
from langgraph.types import Command, Send
from pydantic import BaseModel

from singleflight_agents import Session, Singleflight
from singleflight_agents.adapters import (
    wrap_langchain_tool,
    wrap_langchain_tools,
    wrap_langgraph_node,
)
from singleflight_agents.demo_langgraph import ScriptedChatModel, run_langgraph_demo
from singleflight_agents.fingerprint import make_fingerprint

RUNS: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_runs() -> None:
    RUNS.clear()


class FanState(TypedDict):
    url: str
    pages: Annotated[list[str], operator.add]


class PageRequest(TypedDict):
    url: str


def fetch_sync(state: PageRequest) -> dict[str, Any]:
    RUNS["fetch"] += 1
    time.sleep(0.05)
    return {"pages": [state["url"].upper()]}


async def fetch_async(state: PageRequest) -> dict[str, Any]:
    RUNS["fetch"] += 1
    await asyncio.sleep(0.05)
    return {"pages": [state["url"].upper()]}


def _fan_out_graph(node: Any) -> Any:
    builder = StateGraph(FanState)
    builder.add_node("fetch", node)
    builder.add_conditional_edges(START, lambda s: [Send("fetch", {"url": s["url"]})] * 6)
    builder.add_edge("fetch", END)
    return builder.compile()


@pytest.mark.parametrize(("node", "use_async"), [(fetch_sync, False), (fetch_sync, True),
                                                 (fetch_async, True)])
async def test_send_fan_out_of_identical_calls_executes_once(
        sqlite_sf: Singleflight, node: Any, use_async: bool) -> None:
    graph = _fan_out_graph(wrap_langgraph_node(sqlite_sf, node, bounded_read=True))
    assert graph.builder.nodes["fetch"].input_schema is PageRequest  # inferred as before
    state = {"url": "https://example.com", "pages": []}
    final = await graph.ainvoke(state) if use_async else graph.invoke(state)
    assert final["pages"] == ["HTTPS://EXAMPLE.COM"] * 6
    assert RUNS["fetch"] == 1
    tools = sqlite_sf.summary()["tools"]
    assert tools[f"{node.__module__}.{node.__qualname__}"]["calls"] == 6
    # keyed on the state the node received: the Send payload
    key = make_fingerprint(f"{node.__module__}.{node.__qualname__}", {"url": "https://example.com"})
    assert sqlite_sf.store.get(key) is not None


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@tool
def search_docs(query: str) -> str:
    """Search the help center."""
    RUNS["search_docs"] += 1
    time.sleep(0.05)
    return f"refunds within 30 days ({query})"


@tool
async def get_order(order_id: int, state: Annotated[dict[str, Any], InjectedState]) -> str:
    """Look up an order."""
    RUNS["get_order"] += 1
    await asyncio.sleep(0.05)
    return f"order {order_id}: delivered ({len(state['messages'])} messages seen)"


def _agent_graph(tools: list[BaseTool], script: list[tuple[str, dict[str, Any]]]) -> Any:
    model = ScriptedChatModel(script=script).bind_tools(tools)

    def agent(state: AgentState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(AgentState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(tools))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile()


@pytest.mark.parametrize("use_async", [False, True])
async def test_tool_node_loop_with_a_fake_chat_model(sqlite_sf: Singleflight,
                                                     use_async: bool) -> None:
    script = [("search_docs", {"query": "refunds"}), ("get_order", {"order_id": 7}),
              ("search_docs", {"query": "refunds"}), ("get_order", {"order_id": 7}),
              ("search_docs", {"query": "returns"})]
    tools = wrap_langchain_tools(sqlite_sf, [search_docs, get_order], bounded_read=True)
    graph = _agent_graph(tools, script)
    start = {"messages": [HumanMessage("refund for order 7?")]}
    if use_async:
        final = await graph.ainvoke(start)
    else:
        # get_order is async only: like the original, it cannot run from invoke()
        with pytest.raises(NotImplementedError):
            graph.invoke(start)
        graph = _agent_graph([tools[0]], [s for s in script if s[0] == "search_docs"])
        final = graph.invoke(start)
    answers = [m for m in final["messages"] if isinstance(m, ToolMessage)]
    expected_ids = [f"call_{i}" for i in range(len(answers))]
    assert [m.tool_call_id for m in answers] == expected_ids  # each call answered, in order
    assert answers[0].content == answers[2 if use_async else 1].content
    assert RUNS["search_docs"] == 2  # "refunds" once, "returns" once
    assert RUNS["get_order"] == (1 if use_async else 0)
    assert isinstance(final["messages"][-1], AIMessage)


def test_what_the_model_sees_is_unchanged(sqlite_sf: Singleflight) -> None:
    class Upper(BaseTool):
        name: str = "upper"
        description: str = "Upper-case a text."
        args_schema: type[BaseModel] = UpperArgs

        def _run(self, text: str, run_manager: Any = None) -> str:
            return text.upper()

    def add(a: int, b: int = 2) -> int:
        """Add two numbers."""
        return a + b

    originals = [search_docs, get_order, lookup, Upper(),
                 StructuredTool.from_function(add, return_direct=True,
                                              response_format="content")]
    for original in originals:  # key=: lookup reads the store, which is never keyed
        wrapped = wrap_langchain_tool(sqlite_sf, original, deterministic=True,
                                      key=lambda **model_args: model_args)
        assert type(wrapped).__name__ == type(original).__name__
        assert isinstance(wrapped, type(original))
        assert convert_to_openai_tool(wrapped) == convert_to_openai_tool(original)
        schema = wrapped.tool_call_schema
        assert not isinstance(schema, dict)
        assert schema.model_json_schema() == original.tool_call_schema.model_json_schema()
        for attr in ("name", "description", "args", "return_direct", "response_format",
                     "args_schema"):
            assert getattr(wrapped, attr) == getattr(original, attr)
    assert wrap_langchain_tool(sqlite_sf, Upper(), deterministic=True).invoke("ab") == "AB"


class UpperArgs(BaseModel):
    text: str


@tool
def lookup(query: str, state: Annotated[dict[str, Any], InjectedState],
           call_id: Annotated[str, InjectedToolCallId],
           store: Annotated[BaseStore, InjectedStore()], runtime: ToolRuntime) -> str:
    """Look something up."""
    RUNS["lookup"] += 1
    assert runtime.tool_call_id == call_id and store is runtime.store
    return f"{query}: found"


class LookupState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    user: str


async def test_injected_arguments_key_says_are_irrelevant_are_not_keyed(
        sqlite_sf: Singleflight) -> None:
    builder = StateGraph(LookupState)
    # lookup reads the state, the store and the runtime: a key= naming only the model's
    # arguments says none of them changes the answer.
    builder.add_node("tools", ToolNode(wrap_langchain_tools(
        sqlite_sf, [lookup], bounded_read=True, key=lambda query: {"query": query})))
    builder.add_edge(START, "tools")
    builder.add_edge("tools", END)
    graph = builder.compile(store=InMemoryStore())
    for i, user in enumerate(["ada", "grace", "alan"]):  # other state, store, ids, runtime
        call = {"name": "lookup", "args": {"query": "q"}, "id": f"id-{i}", "type": "tool_call"}
        final = await graph.ainvoke({"messages": [AIMessage("", tool_calls=[call])],
                                     "user": user})
        assert final["messages"][-1].tool_call_id == f"id-{i}"
        assert final["messages"][-1].content == "q: found"
    assert RUNS["lookup"] == 1
    receipt = sqlite_sf.store.get(make_fingerprint(f"{__name__}.lookup", {"query": "q"}))
    assert receipt is not None and receipt.inputs == '{"query":"q"}'


class GreetState(TypedDict):
    name: str
    greeting: str


@dataclass
class Context:
    user: str


SEEN: list[tuple[str, str, bool]] = []


def greet(state: GreetState, config: RunnableConfig, *, runtime: Runtime[Context],
          store: BaseStore) -> dict[str, Any]:
    """Greet."""
    SEEN.append((config["configurable"]["thread_id"], runtime.context.user,
                 isinstance(store, InMemoryStore)))
    return {"greeting": f"hello {state['name']}"}


async def agreet(state: GreetState, config: RunnableConfig) -> dict[str, Any]:
    return {"greeting": f"hi {state['name']} ({config['configurable']['thread_id']})"}


def test_sync_and_async_nodes_keep_their_kind_and_signature(sqlite_sf: Singleflight) -> None:
    for node in (greet, agreet):
        wrapped = wrap_langgraph_node(sqlite_sf, node, deterministic=True)
        assert inspect.iscoroutinefunction(wrapped) is inspect.iscoroutinefunction(node)
        assert inspect.signature(wrapped) == inspect.signature(node)
        assert typing.get_type_hints(wrapped) == typing.get_type_hints(node)
        assert (wrapped.__name__, wrapped.__doc__) == (node.__name__, node.__doc__)


def test_config_runtime_and_store_are_injected_but_not_keyed(sqlite_sf: Singleflight) -> None:
    SEEN.clear()
    builder = StateGraph(GreetState, context_schema=Context)
    builder.add_node("greet", wrap_langgraph_node(sqlite_sf, greet, deterministic=True))
    builder.add_edge(START, "greet")
    graph = builder.compile(store=InMemoryStore())
    runs = [("ada", "t1", "u1"), ("ada", "t2", "u2"), ("bob", "t3", "u3")]
    for name, thread, user in runs:
        final = graph.invoke({"name": name}, {"configurable": {"thread_id": thread}},
                             context=Context(user=user))
        assert final["greeting"] == f"hello {name}"
    assert SEEN == [("t1", "u1", True), ("t3", "u3", True)]  # the second run was a receipt


async def test_async_node_gets_config(sqlite_sf: Singleflight) -> None:
    builder = StateGraph(GreetState)
    builder.add_node("greet", wrap_langgraph_node(sqlite_sf, agreet, deterministic=True))
    builder.add_edge(START, "greet")
    final = await builder.compile().ainvoke({"name": "ada"}, {"configurable": {"thread_id": "t"}})
    assert final["greeting"] == "hi ada (t)"


def test_key_selects_what_matters(sqlite_sf: Singleflight) -> None:
    wrapped = wrap_langgraph_node(sqlite_sf, fetch_sync, key=lambda s: s["url"],
                                  bounded_read=True)
    assert wrapped({"url": "a", "trace": 1}) == wrapped({"url": "a", "trace": 2})
    assert RUNS["fetch"] == 1


def test_a_node_or_tool_without_a_safety_flag_runs_every_call_unshared(
        sqlite_sf: Singleflight, db_path: Path) -> None:
    # One policy everywhere: unflagged is accepted, never shared, never stored.
    node = wrap_langgraph_node(sqlite_sf, fetch_sync)
    plain = wrap_langchain_tool(sqlite_sf, search_docs, deterministic=False, ttl_seconds=60)
    graph = _fan_out_graph(node)
    with Session(db_path) as run, run.scope("unflagged") as scope:
        assert graph.invoke({"url": "u", "pages": []})["pages"] == ["U"] * 6
        assert plain.invoke({"query": "q"}) == plain.invoke({"query": "q"})
        assert list(run.engine.store.iter_receipts()) == []
    assert (RUNS["fetch"], RUNS["search_docs"]) == (6, 2)
    assert Counter(str(o.source) for o in scope.outcomes) == {"executed_unshared": 8}
    assert all(o.receipt is None for o in scope.outcomes)


def test_bad_wrapper_arguments_are_refused(sqlite_sf: Singleflight) -> None:
    for wrap, target in ((wrap_langgraph_node, fetch_sync), (wrap_langchain_tool, search_docs),
                         (wrap_langchain_tools, [search_docs])):
        with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
            wrap(sqlite_sf, target, bounded_read=True, mode="replay")
        with pytest.raises(TypeError, match=r"record_command= .* belongs to the run"):
            wrap(sqlite_sf, target, bounded_read=True, record_command="make record")
    with pytest.raises(TypeError, match="tool_name="):
        wrap_langgraph_node(sqlite_sf, lambda s: s, deterministic=True)
    with pytest.raises(TypeError, match="same name"):
        wrap_langchain_tools(sqlite_sf, [search_docs], tool_name="x", deterministic=True)
    with pytest.raises(TypeError, match=r"unknown tool option.*colour"):
        wrap_langgraph_node(sqlite_sf, fetch_sync, deterministic=True, colour="red")
    # ttl= is an alias of ttl_seconds
    wrap_langgraph_node(sqlite_sf, fetch_sync, deterministic=True, ttl=5)({"url": "u"})
    receipt = sqlite_sf.store.get(make_fingerprint(f"{__name__}.fetch_sync", {"url": "u"}))
    assert receipt is not None and receipt.expires_at - receipt.created_at == pytest.approx(5)


def test_side_effecting_always_runs(sqlite_sf: Singleflight) -> None:
    wrapped = wrap_langchain_tool(sqlite_sf, search_docs, side_effecting=True)
    assert wrapped.invoke({"query": "a"}) == wrapped.invoke({"query": "a"})
    assert RUNS["search_docs"] == 2


def test_sync_and_async_tool_paths(sqlite_sf: Singleflight) -> None:
    calls: list[str] = []

    def double(x: int) -> int:
        calls.append("sync")
        return 2 * x

    async def adouble(x: int) -> int:
        calls.append("async")
        return 2 * x

    both = StructuredTool.from_function(double, coroutine=adouble, description="Double.")
    wrapped = wrap_langchain_tool(sqlite_sf, both, deterministic=True, tool_name="double")
    assert wrapped.invoke({"x": 1}) == 2
    assert asyncio.run(wrapped.ainvoke({"x": 2})) == 4
    assert calls == ["sync", "async"]
    assert (asyncio.run(wrapped.ainvoke({"x": 1})), wrapped.invoke({"x": 2})) == (2, 4)
    assert calls == ["sync", "async"]  # one key for both paths: receipts serve either
    sync_only = wrap_langchain_tool(sqlite_sf, search_docs, deterministic=True)
    assert asyncio.run(sync_only.ainvoke({"query": "z"})) == sync_only.invoke({"query": "z"})
    assert RUNS["search_docs"] == 1


class NotesState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    notes: Annotated[list[str], operator.add]


@tool
def note(fact: str, call_id: Annotated[str, InjectedToolCallId]) -> Command[Any]:
    """Take a note."""
    RUNS["note"] += 1
    time.sleep(0.2)
    return Command(update={"messages": [ToolMessage(f"noted {fact}", tool_call_id=call_id)],
                           "notes": [fact]})


@tool
def echo(text: str, call_id: Annotated[str, InjectedToolCallId]) -> ToolMessage:
    """Echo."""
    RUNS["echo"] += 1
    return ToolMessage(text, tool_call_id=call_id, artifact={"pair": (1, 2)})


def test_shared_tool_messages_answer_each_callers_own_call(sqlite_sf: Singleflight) -> None:
    builder = StateGraph(NotesState)
    builder.add_node("tools", ToolNode(wrap_langchain_tools(sqlite_sf, [note, echo],
                                                            deterministic=True)))
    builder.add_edge(START, "tools")
    graph = builder.compile()
    calls = [{"name": "note", "args": {"fact": "f"}, "id": f"n{i}", "type": "tool_call"}
             for i in range(3)]
    with pytest.warns(RuntimeWarning, match="cannot be stored"):  # a Command: in flight only
        final = graph.invoke({"messages": [AIMessage("", tool_calls=calls)], "notes": []})
    assert RUNS["note"] == 1
    assert [m.tool_call_id for m in final["messages"][1:]] == ["n0", "n1", "n2"]
    assert final["notes"] == ["f"] * 3
    for i in range(2):  # a ToolMessage is stored: the second call is a receipt
        call = {"name": "echo", "args": {"text": "t"}, "id": f"e{i}", "type": "tool_call"}
        final = graph.invoke({"messages": [AIMessage("", tool_calls=[call])], "notes": []})
        assert final["messages"][-1].tool_call_id == f"e{i}"
        assert final["messages"][-1].artifact == {"pair": (1, 2)}
    assert RUNS["echo"] == 1


def chat(state: AgentState) -> dict[str, Any]:
    RUNS["chat"] += 1
    return {"messages": [AIMessage("hi", id="m1", usage_metadata={
        "input_tokens": 1, "output_tokens": 1, "total_tokens": 2})]}


def test_messages_in_results_are_stored_and_rebuilt(sqlite_sf: Singleflight,
                                                    db_path: Path) -> None:
    state = {"messages": [HumanMessage("hello", id="h1")]}
    first = wrap_langgraph_node(sqlite_sf, chat, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # persisted: no "cannot be stored" warning
        expected = first(state)
    with Singleflight(db_path) as other:  # another engine: served from the receipt
        again = wrap_langgraph_node(other, chat, deterministic=True)(state)
    assert RUNS["chat"] == 1
    assert again == expected and type(again["messages"][0]) is AIMessage


def test_threads_calling_a_wrapped_tool_share_one_execution(sqlite_sf: Singleflight) -> None:
    wrapped = wrap_langchain_tool(sqlite_sf, search_docs, bounded_read=True)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(wrapped.invoke("q")))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["refunds within 30 days (q)"] * 8
    assert RUNS["search_docs"] == 1


@pytest.mark.slow
async def test_demo_runs_offline(sqlite_sf: Singleflight) -> None:
    lines: list[str] = []
    summary = await run_langgraph_demo(sqlite_sf, emit=lines.append)
    assert summary["unique_executions"] == 3 and summary["calls"] == 14
    assert "with singleflight:     3 executions" in "\n".join(lines)


class Repeat(BaseTool):
    """A tool written as a class, with no args_schema: its schema comes from _run."""

    name: str = "repeat"
    description: str = "Repeat a text."

    def _run(self, text: str, times: int = 1) -> str:
        RUNS["repeat"] += 1
        return text * times


def test_keys_apply_defaults_and_ignore_config(sqlite_sf: Singleflight) -> None:
    original = Repeat()
    wrapped = wrap_langchain_tool(sqlite_sf, original, deterministic=True)
    assert convert_to_openai_tool(wrapped) == convert_to_openai_tool(original)
    assert wrapped.invoke({"text": "a"}) == "a"
    assert wrapped.invoke({"text": "a", "times": 1}, {"tags": ["x"], "run_name": "r"}) == "a"
    assert wrapped.invoke("a") == "a"  # a string input binds to the first argument
    assert asyncio.run(wrapped.ainvoke({"text": "a"}, {"metadata": {"m": 1}})) == "a"
    assert RUNS["repeat"] == 1
    assert wrapped.invoke({"text": "a", "times": 2}) == "aa"
    assert RUNS["repeat"] == 2
    by_text = wrap_langchain_tool(sqlite_sf, Repeat(), deterministic=True, tool_name="r2",
                                  key=lambda text, times: text.lower())
    assert by_text.invoke({"text": "A"}) == by_text.invoke({"text": "a"}) == "A"


def test_wrapping_twice_and_anonymous_nodes_are_refused(sqlite_sf: Singleflight) -> None:
    wrapped = wrap_langchain_tool(sqlite_sf, search_docs, deterministic=True)
    with pytest.raises(TypeError, match="wrapped already"):
        wrap_langchain_tool(sqlite_sf, wrapped, deterministic=True)
    with pytest.raises(TypeError, match="tool_name="):
        wrap_langgraph_node(sqlite_sf, functools.partial(fetch_sync), bounded_read=True)
    named = wrap_langgraph_node(sqlite_sf, functools.partial(fetch_sync), bounded_read=True,
                                tool_name="fetch.partial")
    assert named({"url": "u"}) == {"pages": ["U"]}
    # never shared, so its name cannot mix results up
    assert wrap_langgraph_node(sqlite_sf, lambda s: s, side_effecting=True)({"a": 1}) == {"a": 1}


async def test_a_tool_whose_arun_hands_over_to_run_does_not_wait_for_itself(sqlite_sf) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from langchain_core.tools import BaseTool

    from singleflight_agents.adapters import wrap_langchain_tool

    class Search(BaseTool):
        name: str = "search"
        description: str = "Search."
        runs: int = 0

        def _run(self, query: str) -> str:
            self.runs += 1
            return query.upper()

        async def _arun(self, query: str) -> str:
            return await asyncio.to_thread(self._run, query)

    tool = wrap_langchain_tool(sqlite_sf, Search(), tool_name="t.search", deterministic=True)
    assert await asyncio.wait_for(tool.ainvoke({"query": "a"}), 10) == "A"
    assert await asyncio.wait_for(tool.ainvoke({"query": "a"}), 10) == "A"
