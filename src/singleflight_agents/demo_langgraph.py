"""The LangGraph demo: a scripted agent, offline, with duplicate tool calls and a fan-out.

A fake chat model (no network, no key) asks in one turn for four tool calls, two of them
duplicates; a ``ToolNode`` runs them. Its answer then fans out with ``Send`` to three
identical page fetches. The run is made twice (the agent and its retry), once with plain
tools and nodes and once with the same ones wrapped by the adapter, each in a scope of its
own so the comparison starts cold every time.
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypedDict

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import InjectedState, ToolNode
from langgraph.types import Send

from .adapters.langgraph import wrap_langchain_tool, wrap_langgraph_node
from .engine import Singleflight
from .reporting import format_summary

COST_USD = 0.05
LATENCY_S = 0.2
QUESTION = "Can I get a refund for order 1042?"
SCRIPT: list[tuple[str, dict[str, Any]]] = [
    ("search_docs", {"query": "refund policy"}), ("get_order", {"order_id": 1042}),
    ("search_docs", {"query": "refund policy"}), ("get_order", {"order_id": 1042})]
PAGE = "https://example.com/help/refunds"
FAN_OUT = 3


class ScriptedChatModel(BaseChatModel):
    """A chat model that plays a script: after a human message it asks for ``script``'s
    tool calls (tool name, arguments), after tool results it answers with their contents.

    ``bind_tools`` binds the tools' OpenAI schemas, as real providers do; asking for a tool
    that was not bound raises."""

    script: list[tuple[str, dict[str, Any]]]

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        bound = {spec["function"]["name"] for spec in kwargs.get("tools", [])}
        if isinstance(messages[-1], HumanMessage):
            missing = {name for name, _ in self.script} - bound
            if missing:
                raise ValueError(f"tools not bound to the model: {sorted(missing)}")
            calls = [{"name": name, "args": args, "id": f"call_{i}", "type": "tool_call"}
                     for i, (name, args) in enumerate(self.script)]
            message = AIMessage(content="", tool_calls=calls)
        else:
            answers = [str(m.content) for m in messages if isinstance(m, ToolMessage)]
            message = AIMessage(content=" | ".join(answers))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    @property
    def _llm_type(self) -> str:
        return "scripted"


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    pages: Annotated[list[str], operator.add]


class PageRequest(TypedDict):
    url: str


def make_tools(executions: Counter[str]) -> list[BaseTool]:
    """The agent's two tools; each execution is counted in ``executions``."""

    @tool
    async def search_docs(query: str) -> str:
        """Search the help center."""
        executions["search_docs"] += 1
        await asyncio.sleep(LATENCY_S)
        return f"Refunds within 30 days ({query})"

    @tool
    async def get_order(order_id: int, state: Annotated[dict[str, Any], InjectedState]) -> str:
        """Look up an order."""
        executions["get_order"] += 1
        await asyncio.sleep(LATENCY_S)
        return f"order {order_id}: delivered 12 days ago"

    return [search_docs, get_order]


def make_fetch(executions: Counter[str]) -> Callable[..., Any]:
    async def fetch_page(state: PageRequest) -> dict[str, Any]:
        executions["fetch_page"] += 1
        await asyncio.sleep(LATENCY_S)
        return {"pages": [f"{state['url']}: full refund policy"]}

    return fetch_page


def build_graph(model: ScriptedChatModel, tools: list[BaseTool], fetch: Callable[..., Any]) -> Any:
    """The agent loop (model, ToolNode, model) and its ``Send`` fan-out to ``fetch``."""
    bound = model.bind_tools(tools)

    async def agent(state: AgentState) -> dict[str, Any]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    def route(state: AgentState) -> str | list[Send]:
        last = state["messages"][-1]
        if isinstance(last, AIMessage) and last.tool_calls:
            return "tools"
        return [Send("fetch", {"url": PAGE}) for _ in range(FAN_OUT)]

    builder = StateGraph(AgentState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(tools))
    builder.add_node("fetch", fetch)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, ["tools", "fetch"])
    builder.add_edge("tools", "agent")
    builder.add_edge("fetch", END)
    return builder.compile()


async def _twice(graph: Any) -> tuple[list[Any], float]:
    started = time.perf_counter()
    results = []
    for _ in range(2):  # the agent, then its retry
        final = await graph.ainvoke({"messages": [HumanMessage(QUESTION)], "pages": []})
        results.append((final["messages"][-1].content, final["pages"]))
    return results, time.perf_counter() - started


async def run_langgraph_demo(sf: Singleflight, emit: Callable[[str], None] = print
                             ) -> dict[str, Any]:
    """Run the comparison, print it with ``emit``, and return the engine's summary."""
    model = ScriptedChatModel(script=SCRIPT)
    plain: Counter[str] = Counter()
    baseline, baseline_s = await _twice(build_graph(model, make_tools(plain), make_fetch(plain)))

    shared: Counter[str] = Counter()
    options: dict[str, Any] = {"ttl_seconds": 300, "estimated_cost_usd": COST_USD,
                               "scope": f"langgraph-demo-{sf.run_id}"}
    tools = [wrap_langchain_tool(sf, tool, tool_name=f"langchain.tool.{tool.name}",
                                 bounded_read=True, **options) for tool in make_tools(shared)]
    fetch = wrap_langgraph_node(sf, make_fetch(shared), tool_name="langgraph.node.fetch_page",
                                bounded_read=True, **options)
    deduplicated, shared_s = await _twice(build_graph(model, tools, fetch))
    if deduplicated != baseline:
        raise AssertionError("deduplicated results differ from the baseline")

    def line(label: str, counts: Counter[str], seconds: float) -> str:
        runs = sum(counts.values())
        detail = ", ".join(f"{name} {n}" for name, n in counts.items())
        return f"  {label} {runs:2} executions, ~${runs * COST_USD:.2f}, {seconds:.2f} s ({detail})"

    emit(f"A scripted LangGraph agent, run twice (a run and its retry). Each run makes "
         f"{len(SCRIPT)} tool calls in one turn")
    emit(f"({len(SCRIPT) // 2} duplicates) and a Send fan-out of {FAN_OUT} identical page "
         f"fetches: {2 * (len(SCRIPT) + FAN_OUT)} calls in all.")
    emit(line("without singleflight:", plain, baseline_s))
    emit(line("with singleflight:   ", shared, shared_s))
    emit("")
    summary = sf.summary()
    emit(format_summary(summary))
    return summary
