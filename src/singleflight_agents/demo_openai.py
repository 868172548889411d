"""The OpenAI Agents SDK demo, offline: scripted agents repeat a paid search tool.

Agents driven by ``agents.testing.ScriptedModel`` (no API key, no network) call a search tool
twice in one turn, again in the next turn, and from three agents running at once: seven calls,
three distinct. The same script runs once with ``agents.function_tool`` and once with
:func:`singleflight_agents.adapters.function_tool`. Each run uses its own scope, so the
comparison starts cold every time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from agents import Agent, FunctionTool, RunConfig, Runner
from agents import function_tool as sdk_function_tool
from agents.items import ToolCallOutputItem
from agents.testing import ScriptedModel, assistant_message, function_call

from .adapters.openai_agents import function_tool
from .demo import report_comparison, search_help_center
from .engine import Singleflight

COST_USD = 0.10
LATENCY_S = 0.2
_CONFIG = RunConfig(tracing_disabled=True, workflow_name="singleflight openai demo")


def _search_tool(executions: list[str]) -> Callable[..., Any]:
    async def search_docs(query: str) -> str:
        """Search the help center.

        Args:
            query: What to look for.
        """
        return await search_help_center(query, executions, LATENCY_S)

    return search_docs


def _call(query: str, call_id: str) -> Any:
    return function_call("search_docs", {"query": query}, call_id=call_id)


def _support_script() -> list[Any]:
    """One agent, three turns: a duplicate in one turn, then a repeat across turns."""
    return [
        [_call("refund policy", "s1"), _call("refund policy", "s2")],
        [_call("refund policy", "s3"), _call("shipping times", "s4")],
        [assistant_message("Refunds within 30 days; orders ship in 2 days.")],
    ]


def _triage_script(index: int, query: str) -> list[Any]:
    return [[_call(query, f"t{index}")], [assistant_message(f"Triage {index}: answered.")]]


async def _run(agent: Agent[Any]) -> tuple[str, list[str]]:
    result = await Runner.run(agent, "A customer asks about a refund.", run_config=_CONFIG)
    outputs = [str(item.output) for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    return str(result.final_output), outputs


async def _agents(tool: FunctionTool) -> list[tuple[str, list[str]]]:
    """The support agent, then three agents at once; what each answered and was told."""
    def agent(name: str, script: Sequence[Any]) -> Agent[Any]:
        return Agent(name=name, instructions="Answer from the help center.",
                     model=ScriptedModel(script), tools=[tool])

    first = await _run(agent("support", _support_script()))
    queries = ("warranty terms", "warranty terms", "refund policy")
    rest = await asyncio.gather(*(_run(agent(f"triage-{i}", _triage_script(i, q)))
                                  for i, q in enumerate(queries)))
    return [first, *rest]


async def run_openai_demo(sf: Singleflight, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the comparison, print it with ``emit``; return the counts and the engine's summary
    (``calls``, ``baseline_executions``, ``executions``, ``summary``)."""
    baseline: list[str] = []
    started = time.perf_counter()
    expected = await _agents(sdk_function_tool(_search_tool(baseline)))
    baseline_s = time.perf_counter() - started

    executions: list[str] = []
    tool = function_tool(sf, _search_tool(executions), tool_name="search_docs",
                         bounded_read=True, ttl_seconds=300,
                         estimated_cost_usd=COST_USD, scope=f"openai-demo-{sf.run_id}")
    started = time.perf_counter()
    got = await _agents(tool)
    shared_s = time.perf_counter() - started
    if got != expected:
        raise AssertionError("deduplicated answers differ from the baseline")

    return report_comparison(sf, emit, (
        f"OpenAI Agents SDK, scripted offline: 4 agents, {len(baseline)} search_docs calls "
        f"(a duplicate in one turn, a repeat across turns, 3 agents in parallel):"), [
        ("agents.function_tool", len(baseline), baseline_s),
        ("singleflight_agents function_tool", len(executions), shared_s)], COST_USD)
