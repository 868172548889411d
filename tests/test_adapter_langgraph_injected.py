"""What ToolNode injects into a shared tool is keyed when the tool declares it reads it (state
fields, the whole state, the runtime's state and context); the store, which cannot be keyed,
needs key=. A wrong answer is never served for other injected values."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import InjectedToolArg, StructuredTool, tool
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import InjectedState, InjectedStore, ToolNode, ToolRuntime
from langgraph.store.base import BaseStore
from langgraph.store.memory import InMemoryStore
from pydantic import BaseModel

from singleflight_agents import Singleflight
from singleflight_agents.adapters import wrap_langchain_tool

RUNS: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_runs() -> None:
    RUNS.clear()


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    user: str


class PydanticState(BaseModel):
    messages: Annotated[list[AnyMessage], add_messages]
    user: str


@dataclass
class Context:
    tenant: str


@tool
def greet_field(word: str, user: Annotated[str, InjectedState("user")]) -> str:
    """Greet the user of the state."""
    RUNS["greet_field"] += 1
    return f"{word}, {user}"


@tool
def greet_state(word: str, state: Annotated[Any, InjectedState]) -> str:
    """Greet the user of the whole state."""
    RUNS["greet_state"] += 1
    user = state["user"] if isinstance(state, dict) else state.user
    return f"{word}, {user}"


@tool
def greet_tenant(word: str, runtime: ToolRuntime) -> str:
    """Greet the tenant of the run's context."""
    RUNS["greet_tenant"] += 1
    return f"{word}, {runtime.context.tenant}"


@tool
def recall(word: str, store: Annotated[BaseStore, InjectedStore()]) -> str:
    """Read a note from the store."""
    RUNS["recall"] += 1
    item = store.get(("notes",), word)
    return "nothing" if item is None else str(item.value["text"])


def _graph(tool_: Any, schema: Any = State, **compile_args: Any) -> Any:
    builder = StateGraph(schema, context_schema=Context)
    builder.add_node("tools", ToolNode([tool_]))
    builder.add_edge(START, "tools")
    return builder.compile(**compile_args)


def _ask(name: str, user: str, call_id: str = "c1") -> dict[str, Any]:
    call = {"name": name, "args": {"word": "hi"}, "id": call_id, "type": "tool_call"}
    return {"messages": [AIMessage("", tool_calls=[call])], "user": user}


def _answer(final: Any) -> str:
    messages = final["messages"] if isinstance(final, dict) else final.messages
    return str(messages[-1].content)


def test_an_injected_state_field_is_keyed(sqlite_sf: Singleflight) -> None:
    graph = _graph(wrap_langchain_tool(sqlite_sf, greet_field, deterministic=True))
    answers = [_answer(graph.invoke(_ask("greet_field", user, f"c{i}")))
               for i, user in enumerate(["ada", "grace", "ada"])]
    assert answers == ["hi, ada", "hi, grace", "hi, ada"]
    assert RUNS["greet_field"] == 2  # ada's answer served to ada only


@pytest.mark.parametrize("schema", [State, PydanticState])
def test_the_whole_injected_state_is_keyed_without_message_ids(sqlite_sf: Singleflight,
                                                               schema: Any) -> None:
    graph = _graph(wrap_langchain_tool(sqlite_sf, greet_state, deterministic=True), schema)
    # Each run gives the messages new ids: the same state otherwise, so shared.
    answers = [_answer(graph.invoke(_ask("greet_state", user))) for user in ["ada", "ada", "grace"]]
    assert answers == ["hi, ada", "hi, ada", "hi, grace"]
    assert RUNS["greet_state"] == 2


def test_the_runtimes_context_is_keyed(sqlite_sf: Singleflight) -> None:
    graph = _graph(wrap_langchain_tool(sqlite_sf, greet_tenant, deterministic=True))
    answers = [_answer(graph.invoke(_ask("greet_tenant", "ada"), context=Context(tenant)))
               for tenant in ["acme", "initech", "acme"]]
    assert answers == ["hi, acme", "hi, initech", "hi, acme"]
    assert RUNS["greet_tenant"] == 2


def test_a_shared_tool_that_reads_the_store_needs_a_key(sqlite_sf: Singleflight) -> None:
    with pytest.raises(TypeError, match=r"tool 'recall' .*store.* pass key=") as refused:
        wrap_langchain_tool(sqlite_sf, recall, bounded_read=True)
    assert "\n" not in str(refused.value)
    store = InMemoryStore()
    store.put(("notes",), "hi", {"text": "first"})
    unshared = _graph(wrap_langchain_tool(sqlite_sf, recall), store=store)  # runs every time
    assert _answer(unshared.invoke(_ask("recall", "ada"))) == "first"
    # key= names what identifies a call; here the model's argument and the note it reads.
    keyed = wrap_langchain_tool(sqlite_sf, recall, bounded_read=True, tool_name="tests.recall",
                                key=lambda word, store: (word, store.get(("notes",), word).value))
    graph = _graph(keyed, store=store)
    assert [_answer(graph.invoke(_ask("recall", "ada"))) for _ in range(2)] == ["first"] * 2
    store.put(("notes",), "hi", {"text": "second"})
    assert _answer(graph.invoke(_ask("recall", "ada"))) == "second"
    assert RUNS["recall"] == 3


def test_a_runtime_that_carries_the_store_needs_a_key(sqlite_sf: Singleflight) -> None:
    graph = _graph(wrap_langchain_tool(sqlite_sf, greet_tenant, deterministic=True),
                   store=InMemoryStore())
    with pytest.raises(TypeError, match=r"tool 'greet_tenant' .*runtime.*store.* pass key="):
        graph.invoke(_ask("greet_tenant", "ada"), context=Context("acme"))
    keyed = wrap_langchain_tool(sqlite_sf, greet_tenant, deterministic=True,
                                tool_name="tests.greet_tenant",
                                key=lambda word, runtime: (word, runtime.context.tenant))
    graph = _graph(keyed, store=InMemoryStore())
    answers = [_answer(graph.invoke(_ask("greet_tenant", user), context=Context(tenant)))
               for user, tenant in [("ada", "acme"), ("grace", "acme"), ("ada", "initech")]]
    assert answers == ["hi, acme", "hi, acme", "hi, initech"]
    assert RUNS["greet_tenant"] == 2  # the key says the user does not matter


class Opaque:
    """A state value the key cannot encode."""


@tool
def describe(word: str, user: Annotated[Any, InjectedState("user")]) -> str:
    """Describe the user of the state."""
    return f"{word}, {type(user).__name__}"


class OpaqueState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    user: Any


def test_an_injected_value_that_cannot_be_keyed_is_refused_with_the_fix(
        sqlite_sf: Singleflight) -> None:
    graph = _graph(wrap_langchain_tool(sqlite_sf, describe, deterministic=True), OpaqueState)
    with pytest.raises(TypeError, match=r"tool 'describe' .*'user'.*Opaque.* pass key="):
        graph.invoke({**_ask("describe", "x"), "user": Opaque()})
    unshared = _graph(wrap_langchain_tool(sqlite_sf, describe), OpaqueState)  # never keyed
    assert _answer(unshared.invoke({**_ask("describe", "x"), "user": Opaque()})) == "hi, Opaque"


# -- values the caller injects, arguments a dict schema does not list ------------------------


@tool
def balance(account: str, user_id: Annotated[str, InjectedToolArg]) -> str:
    """Balance of an account for the user."""
    RUNS[user_id] += 1
    return f"{user_id}:{account}"


def test_a_value_the_caller_injects_is_keyed(sqlite_sf: Singleflight) -> None:
    shared = wrap_langchain_tool(sqlite_sf, balance, bounded_read=True, tool_name="t.balance")
    assert shared.invoke({"account": "main", "user_id": "alice"}) == "alice:main"
    assert shared.invoke({"account": "main", "user_id": "bob"}) == "bob:main"  # not alice's
    assert shared.invoke({"account": "main", "user_id": "alice"}) == "alice:main"
    assert dict(RUNS) == {"alice": 1, "bob": 1}


def test_key_gets_a_value_the_caller_injects_and_the_config_by_name(sqlite_sf: Singleflight) -> None:
    shared = wrap_langchain_tool(sqlite_sf, balance, bounded_read=True, tool_name="t.balance",
                                 key=lambda account, user_id: [account, user_id])
    assert shared.invoke({"account": "a", "user_id": "alice"}) == "alice:a"

    @tool
    def whoami(q: str, config: RunnableConfig) -> str:
        """Who asks."""
        RUNS[q] += 1
        return str(config["configurable"]["user"])

    who = wrap_langchain_tool(sqlite_sf, whoami, bounded_read=True, tool_name="t.who",
                              key=lambda q, config: [q, config["configurable"]["user"]])
    assert [who.invoke({"q": "x"}, config={"configurable": {"user": u}})
            for u in ("alice", "bob", "alice")] == ["alice", "bob", "alice"]
    assert RUNS["x"] == 2


def test_arguments_a_dict_schema_does_not_list_are_keyed(sqlite_sf: Singleflight) -> None:
    def search(**kwargs: Any) -> str:
        RUNS[kwargs.get("lang", "")] += 1
        return f"results for {kwargs}"

    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    loose = StructuredTool(name="search", description="Search.", args_schema=schema, func=search)
    shared = wrap_langchain_tool(sqlite_sf, loose, bounded_read=True, tool_name="t.search")
    assert shared.invoke({"q": "x", "lang": "fr"}) != shared.invoke({"q": "x", "lang": "de"})
    assert dict(RUNS) == {"fr": 1, "de": 1}


def test_values_that_differ_are_keyed_apart() -> None:
    from pydantic import ConfigDict

    from singleflight_agents.adapters._langgraph_keys import keyed

    class Ctx(BaseModel):
        model_config = ConfigDict(extra="allow")
        tenant: str

    assert keyed(Ctx(tenant="acme", user="alice")) != keyed(Ctx(tenant="acme", user="bob"))
    assert keyed({1: "x"}) != keyed({"1": "x"})
    assert keyed({"a": [1]}) == {"a": [1]}
