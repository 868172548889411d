"""PydanticAI demo, fully offline: duplicate tool calls executed once.

    pip install 'singleflight-agents[pydantic-ai]'
    python examples/pydantic_ai_demo.py

Agents driven by PydanticAI's ``FunctionModel`` (no API key, no network) call a paid search
tool twice in one turn, again in the next turn, and from three agents running at once: seven
calls, three distinct. The same script runs once with the plain ``@agent.tool`` and once with
``@pydantic_ai_tool`` under it. Each run uses its own scope, so the comparison starts cold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from singleflight_agents import Singleflight
from singleflight_agents.adapters import pydantic_ai_tool
from singleflight_agents.demo import report_comparison, search_help_center

COST_USD = 0.10
LATENCY_S = 0.2

Turn = Sequence[ToolCallPart] | str
SearchTool = Callable[..., Any]


@dataclass
class Deps:
    customer: str


def search_tool(executions: list[str]) -> SearchTool:
    async def search_docs(ctx: RunContext[Deps], query: str) -> str:
        """Search the help center.

        Args:
            query: What to look for.
        """
        return await search_help_center(query, executions, LATENCY_S)

    return search_docs


def _call(query: str, call_id: str) -> ToolCallPart:
    return ToolCallPart("search_docs", {"query": query}, tool_call_id=call_id)


def _scripted(turns: Sequence[Turn]) -> FunctionModel:
    """A model answering its n-th request with ``turns[n]``: tool calls, or the final text."""
    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        turn = turns[len(messages) // 2]
        return ModelResponse(parts=[TextPart(turn)] if isinstance(turn, str) else list(turn))

    return FunctionModel(respond, model_name="scripted")


SUPPORT: list[Turn] = [  # one agent, three turns: a duplicate in one turn, a repeat across turns
    [_call("refund policy", "s1"), _call("refund policy", "s2")],
    [_call("refund policy", "s3"), _call("shipping times", "s4")],
    "Refunds within 30 days; orders ship in 2 days.",
]


def _triage(index: int, query: str) -> list[Turn]:
    return [[_call(query, f"t{index}")], f"Triage {index}: answered."]


async def _run(turns: Sequence[Turn], tool: SearchTool) -> tuple[str, list[Any]]:
    agent = Agent(_scripted(turns), deps_type=Deps, instructions="Answer from the help center.")
    agent.tool(tool)
    result = await agent.run("A customer asks about a refund.", deps=Deps("ada@example.com"))
    outputs = [part.content for message in result.all_messages() for part in message.parts
               if isinstance(part, ToolReturnPart)]
    return result.output, outputs


async def _agents(tool: SearchTool) -> list[tuple[str, list[Any]]]:
    """The support agent, then three triage agents at once; what each answered and was told."""
    first = await _run(SUPPORT, tool)
    queries = ("warranty terms", "warranty terms", "refund policy")
    rest = await asyncio.gather(*(_run(_triage(i, q), tool) for i, q in enumerate(queries)))
    return [first, *rest]


async def run_demo(sf: Singleflight, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the comparison, print it with ``emit``; return the counts and the engine's summary
    (``calls``, ``baseline_executions``, ``executions``, ``summary``)."""
    baseline: list[str] = []
    started = time.perf_counter()
    expected = await _agents(search_tool(baseline))
    baseline_s = time.perf_counter() - started

    executions: list[str] = []
    tool = pydantic_ai_tool(sf, search_tool(executions), tool_name="search_docs",
                            bounded_read=True, ttl_seconds=300, estimated_cost_usd=COST_USD,
                            scope=f"pydantic-ai-demo-{sf.run_id}")
    started = time.perf_counter()
    got = await _agents(tool)
    shared_s = time.perf_counter() - started
    if got != expected:
        raise AssertionError("deduplicated answers differ from the baseline")

    return report_comparison(sf, emit, (
        f"PydanticAI, scripted offline: 4 agents, {len(baseline)} search_docs calls "
        f"(a duplicate in one turn, a repeat across turns, 3 agents in parallel):"), [
        ("@agent.tool", len(baseline), baseline_s),
        ("@agent.tool + @pydantic_ai_tool", len(executions), shared_s)], COST_USD)


async def main() -> None:
    with Singleflight() as sf:  # receipts in .singleflight/receipts.db under the cwd
        await run_demo(sf)


if __name__ == "__main__":
    asyncio.run(main())
