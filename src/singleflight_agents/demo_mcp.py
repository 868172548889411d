"""The MCP demo, offline: an MCP server over stdio, scripted agents that repeat its tool calls,
then the same run replayed with the server gone.

The server (:func:`serve`, on the ``mcp`` package's own server framework) has two read-only
tools, a paid help-center search and an order lookup. The demo writes a launcher for it into a
temporary directory and runs four agents of the OpenAI Agents SDK, driven by
``agents.testing.ScriptedModel`` (no API key, no network), through
:func:`~singleflight_agents.adapters.receipt_mcp_server`: seven tool calls, three distinct, and
a tool listing on every turn. Then it deletes the launcher and runs the same agents in replay
mode: the server is never started, every listing and call comes from a receipt, and the answers
are the same. Each demo run uses a scope of its own, so it starts cold every time.

``python -m singleflight_agents.demo_mcp [--db PATH]`` runs it (:func:`main`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

COST_USD = 0.10
LATENCY_S = 0.2
_LOG = "SINGLEFLIGHT_DEMO_MCP_LOG"
_LAUNCHER = "from singleflight_agents.demo_mcp import serve\n\nserve()\n"


def serve() -> None:
    """The demo's MCP server, over stdio; each call appends a line to ``$SINGLEFLIGHT_DEMO_MCP_LOG``."""
    from mcp.server.mcpserver import MCPServer
    from mcp.types import ToolAnnotations

    server = MCPServer("help-center", log_level="WARNING")
    read_only = ToolAnnotations(read_only_hint=True)

    def log(tool: str, argument: object) -> None:
        path = os.environ.get(_LOG)
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps([tool, argument]) + "\n")

    @server.tool(annotations=read_only)
    async def search_docs(query: str) -> str:
        """Search the help center."""
        log("search_docs", query)
        await asyncio.sleep(LATENCY_S)  # a paid search API
        return f"best match for {query!r}: https://example.com/help/{query.replace(' ', '-')}"

    @server.tool(annotations=read_only)
    def get_order(order_id: int) -> dict[str, Any]:
        """Look up an order."""
        log("get_order", order_id)
        return {"order_id": order_id, "status": "shipped", "carrier": "DHL"}

    server.run("stdio")


def _scripts() -> list[tuple[str, list[Any]]]:
    """Four agents: one repeats a search in a turn and across turns, three run at once."""
    from agents.testing import assistant_message, function_call

    def search(query: str, call_id: str) -> Any:
        return function_call("search_docs", {"query": query}, call_id=call_id)

    support = [[search("refund policy", "s1"), search("refund policy", "s2")],
               [search("refund policy", "s3"),
                function_call("get_order", {"order_id": 1042}, call_id="s4")],
               [assistant_message("Refunds within 30 days; order 1042 has shipped.")]]
    triage = [(f"triage-{i}", [[search(query, f"t{i}")], [assistant_message(f"Triage {i}: done.")]])
              for i, query in enumerate(("warranty terms", "warranty terms", "refund policy"))]
    return [("support", support), *triage]


async def _run_agents(server: Any) -> list[tuple[str, list[str]]]:
    """What each agent answered and was told, in order."""
    from agents import Agent, RunConfig, Runner
    from agents.items import ToolCallOutputItem
    from agents.testing import ScriptedModel

    config = RunConfig(tracing_disabled=True, workflow_name="singleflight mcp demo")

    async def run(name: str, script: list[Any]) -> tuple[str, list[str]]:
        agent = Agent(name=name, instructions="Answer from the help center.",
                      model=ScriptedModel(script), mcp_servers=[server])
        result = await Runner.run(agent, "A customer asks about a refund.", run_config=config)
        told = [str(item.output) for item in result.new_items
                if isinstance(item, ToolCallOutputItem)]
        return str(result.final_output), told

    (first_name, first), *rest = _scripts()
    answers = [await run(first_name, first)]
    answers += await asyncio.gather(*(run(name, script) for name, script in rest))
    return answers


def _server(sf: Any, launcher: Path, log: Path) -> Any:
    from agents.mcp import MCPServerStdio

    from .adapters.mcp_agents import receipt_mcp_server

    package_root = str(Path(__file__).resolve().parent.parent)  # the child imports this package
    stdio = MCPServerStdio(name="help-center", params={
        "command": sys.executable, "args": [str(launcher)],
        "env": {_LOG: str(log), "PYTHONPATH": package_root}})
    return receipt_mcp_server(sf, stdio, scope=f"mcp-demo-{sf.run_id}", ttl_seconds=600,
                              tools={"search_docs": {"estimated_cost_usd": COST_USD}})


@contextlib.contextmanager
def _mode(sf: Any, mode: str) -> Iterator[None]:
    before, sf.mode = sf.mode, mode
    try:
        yield
    finally:
        sf.mode = before


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def run_mcp_demo(sf: Any, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Record the agents' run against the MCP server, delete the server, replay the run; print
    it with ``emit``. Returns ``calls``, ``listings``, ``server_calls`` (what the server ran
    while recording), ``replay_server_calls``, ``replay_connected`` and ``summary``."""
    from .reporting import format_summary

    workdir = Path(tempfile.mkdtemp(prefix="singleflight-mcp-demo-"))
    try:
        launcher, log = workdir / "help_center_server.py", workdir / "calls.log"
        launcher.write_text(_LAUNCHER)
        started = time.perf_counter()
        async with _server(sf, launcher, log) as server:
            recorded = await _run_agents(server)
        record_s = time.perf_counter() - started
        server_calls = _lines(log)
        rows = sf.summary()["tools"]

        launcher.unlink()  # the server is gone: replay must not need it
        started = time.perf_counter()
        with _mode(sf, "replay"):
            async with _server(sf, launcher, log) as server:
                replayed = await _run_agents(server)
                connected = server.connected
        replay_s = time.perf_counter() - started
        if replayed != recorded:
            raise AssertionError("the replayed run answered differently")
        replay_calls = _lines(log) - server_calls
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary = sf.summary()
    calls = sum(r["calls"] for name, r in rows.items() if not name.endswith(":tools/list"))
    listings = sum(r["calls"] for name, r in rows.items() if name.endswith(":tools/list"))
    emit(f"MCP over stdio, scripted offline: 4 agents make {calls} tool calls (3 distinct) and "
         f"{listings} tool listings against one MCP server (help-center):")
    emit(f"  record:  the server started once and ran {server_calls} tool calls "
         f"({record_s:.2f} s); every other call and listing was served from a receipt or "
         f"shared in flight")
    emit(f"  replay:  the server's launcher deleted; server started: "
         f"{'yes' if connected else 'no'}, tool calls run: {replay_calls}; same answers, "
         f"{replay_s:.2f} s")
    emit("")
    emit(format_summary(summary))
    return {"calls": calls, "listings": listings, "server_calls": server_calls,
            "replay_server_calls": replay_calls, "replay_connected": connected,
            "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m singleflight_agents.demo_mcp [--db PATH]``: the demo on that store (default
    ``.singleflight/receipts.db``)."""
    parser = argparse.ArgumentParser(prog="singleflight-agents mcp-demo", description=(
        "an MCP server over stdio, agents repeating its tool calls, then the run replayed "
        "with the server gone"))
    parser.add_argument("--db", help="the receipt store (path or URL)")
    args = parser.parse_args(argv)
    from .engine import Singleflight
    from .sessions import ignore_inherited_session

    ignore_inherited_session()  # --db is this demo's store, whoever started it
    with Singleflight(args.db) as sf:
        asyncio.run(run_mcp_demo(sf))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
