"""LangGraph / LangChain, fully offline: duplicate tool calls and a Send fan-out run once.

    pip install 'singleflight-agents[langgraph]'
    python examples/langgraph_demo.py

The scripted agent with a fake chat model: ``singleflight-agents langgraph-demo``.
"""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode
from langgraph.types import Send

from singleflight_agents import Singleflight
from singleflight_agents.adapters import wrap_langchain_tools, wrap_langgraph_node
from singleflight_agents.reporting import format_summary


@tool
async def search_docs(query: str) -> str:
    """Search the help center."""
    print(f"  executing search_docs({query!r})")
    await asyncio.sleep(0.2)
    return f"Refunds within 30 days ({query})"


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    pages: Annotated[list[str], operator.add]


async def fetch_page(state: dict[str, Any]) -> dict[str, Any]:
    print(f"  executing fetch_page({state['url']!r})")
    await asyncio.sleep(0.2)
    return {"pages": [f"{state['url']}: full refund policy"]}


async def main() -> None:
    with Singleflight() as sf:  # receipts in .singleflight/receipts.db under the cwd
        options: dict[str, Any] = {"bounded_read": True, "ttl_seconds": 300,
                                   "estimated_cost_usd": 0.05}
        builder = StateGraph(State)
        builder.add_node("tools", ToolNode(wrap_langchain_tools(sf, [search_docs], **options)))
        builder.add_node("fetch", wrap_langgraph_node(sf, fetch_page, **options))
        builder.add_edge(START, "tools")  # then four identical fetches:
        builder.add_conditional_edges(
            "tools", lambda _: [Send("fetch", {"url": "https://example.com/refunds"})] * 4)
        builder.add_edge("fetch", END)
        # One model turn that asks for the same search three times.
        calls = [{"name": "search_docs", "args": {"query": "refund policy"}, "id": f"call_{i}",
                  "type": "tool_call"} for i in range(3)]
        final = await builder.compile().ainvoke(
            {"messages": [AIMessage("", tool_calls=calls)], "pages": []})
        for message in final["messages"][1:]:
            print(f"  {message.tool_call_id}: {message.content}")
        print(f"  pages: {final['pages']}")
        print(format_summary(sf.summary()))


if __name__ == "__main__":
    asyncio.run(main())
