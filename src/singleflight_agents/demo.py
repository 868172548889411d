"""The demo: three agents make six tool calls, three of them duplicates.

Run once without deduplication and once through the engine, on the given store.
Each run uses its own scope, so the comparison starts cold every time.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .engine import Singleflight
from .reporting import format_summary

COST_USD = 0.12
LATENCY_S = 0.25


async def lookup_customer(email: str) -> dict[str, Any]:
    await asyncio.sleep(LATENCY_S)
    return {"email": email, "name": "Ada Lovelace", "plan": "pro", "open_tickets": 2}


async def search_web(query: str) -> list[str]:
    await asyncio.sleep(LATENCY_S)
    return [f"https://example.com/help/{query.replace(' ', '-')}", "https://example.com/terms"]


async def get_order(order_id: int) -> dict[str, Any]:
    await asyncio.sleep(LATENCY_S)
    return {"id": order_id, "status": "delivered", "total_usd": 42.5}


Tool = Callable[..., Awaitable[Any]]


async def _agents(lookup: Tool, search: Tool, order: Tool) -> list[Any]:
    async def billing() -> list[Any]:
        return list(await asyncio.gather(lookup("ada@example.com"), search("refund policy")))

    async def support() -> list[Any]:
        return list(await asyncio.gather(lookup("ada@example.com"), order(1042)))

    async def audit() -> list[Any]:
        return list(await asyncio.gather(search("refund policy"), order(1042)))

    return list(await asyncio.gather(billing(), support(), audit()))


async def run_demo(sf: Singleflight, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the comparison, print it with ``emit``, and return the engine's summary."""
    executions = 0

    def counted(tool: Tool) -> Tool:
        @functools.wraps(tool)
        async def run(*args: Any) -> Any:
            nonlocal executions
            executions += 1
            return await tool(*args)
        return run

    started = time.perf_counter()
    baseline = await _agents(counted(lookup_customer), counted(search_web), counted(get_order))
    baseline_runs, baseline_s = executions, time.perf_counter() - started

    executions = 0
    options = {"ttl_seconds": 300, "estimated_cost_usd": COST_USD, "scope": f"demo-{sf.run_id}"}
    lookup = sf.tool(tool_name="crm.lookup_customer", deterministic=True, **options)(
        counted(lookup_customer))
    search = sf.tool(tool_name="search.web", bounded_read=True, **options)(counted(search_web))
    order = sf.tool(tool_name="orders.get", bounded_read=True, **options)(counted(get_order))
    started = time.perf_counter()
    shared = await _agents(lookup, search, order)
    shared_s = time.perf_counter() - started
    if shared != baseline:
        raise AssertionError("deduplicated results differ from the baseline")

    emit("Three agents, six tool calls, three of them duplicates:")
    emit(f"  without singleflight: {baseline_runs} executions, ~${baseline_runs * COST_USD:.2f}, "
         f"{baseline_s:.2f} s")
    emit(f"  with singleflight:    {executions} executions, ~${executions * COST_USD:.2f}, "
         f"{shared_s:.2f} s")
    emit("")
    summary = sf.summary()
    emit(format_summary(summary))
    return summary


async def search_help_center(query: str, executions: list[str], latency_s: float) -> str:
    """The framework demos' paid search: records the query, takes ``latency_s``."""
    executions.append(query)
    await asyncio.sleep(latency_s)
    return f"help center, best match for {query!r}: https://example.com/help/" + \
        query.replace(" ", "-")


def report_comparison(sf: Singleflight, emit: Callable[[str], None], headline: str,
                      rows: list[tuple[str, int, float]], cost_usd: float) -> dict[str, Any]:
    """Print a framework demo's runs (label, executions, seconds) and the engine's summary;
    the counts and the summary. The first row is the framework without deduplication."""
    emit(headline)
    width = max(len(label) for label, _, _ in rows) + 1
    for label, executions, seconds in rows:
        emit(f"  {label + ':':<{width}} {executions} executions, ~${executions * cost_usd:.2f}, "
             f"{seconds:.2f} s")
    emit("")
    summary = sf.summary()
    emit(format_summary(summary))
    baseline, shared = rows[0][1], rows[-1][1]
    return {"calls": baseline, "baseline_executions": baseline, "executions": shared,
            "summary": summary}
