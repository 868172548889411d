"""A small real MCP server for the tests, on the ``mcp`` package's own server framework.

``python _mcp_server.py stdio`` serves over stdin/stdout; ``python _mcp_server.py http PORT``
serves streamable HTTP on 127.0.0.1:PORT at ``/mcp``. Every tool call appends one JSON line
``[tool, arguments, pid]`` to the file ``$MCP_TEST_LOG`` (when set), so a test can count what
the server really saw, across processes (``tools/list`` requests too). Tools:

- ``search`` (readOnlyHint): structured content and text.
- ``weather`` (readOnlyHint, idempotentHint): text only.
- ``chart`` (readOnlyHint): an image, structured content and ``_meta``, built by hand.
- ``delete`` (destructiveHint): a side effect.
- ``note`` (no annotations): unknown.
- ``lookup`` (idempotentHint only, not read-only): repeatable, still a write.
- ``fails`` (readOnlyHint): an ``isError`` result.
- ``slow`` (readOnlyHint): sleeps ``$MCP_TEST_DELAY`` seconds (default 0.3) first.
- ``charge`` (readOnlyHint, or destructiveHint when ``$MCP_TEST_FLIP`` is ``1``): a tool whose
  annotations change between runs.
- ``crash`` (readOnlyHint): the server process exits mid-call.
- ``export`` (readOnlyHint), only when ``$MCP_TEST_NEW`` is ``1``: a tool a later version of
  the server added.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations

PIXEL = base64.b64encode(bytes(range(256)) + b"\x89PNG\r\n\x1a\n").decode()

class _Logged(MCPServer):
    """Logs each tools/list too, as ``["tools/list", {}, pid]``."""

    async def list_tools(self) -> Any:
        _log("tools/list", {})
        return await super().list_tools()


server = _Logged("singleflight-test-server", log_level="WARNING")
READ = ToolAnnotations(read_only_hint=True)


def _log(tool: str, arguments: dict[str, Any]) -> None:
    path = os.environ.get("MCP_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps([tool, arguments, os.getpid()]) + "\n")


@server.tool(annotations=READ)
def search(query: str, limit: int = 3) -> dict[str, Any]:
    """Search the documents."""
    _log("search", {"query": query, "limit": limit})
    return {"query": query, "hits": [f"{query}-{i}" for i in range(limit)]}


@server.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True))
def weather(city: str) -> str:
    """The weather in a city."""
    _log("weather", {"city": city})
    return f"sunny in {city}"


@server.tool(annotations=READ)
def chart(name: str) -> CallToolResult:
    """A chart, as an image."""
    _log("chart", {"name": name})
    return CallToolResult(
        content=[TextContent(text=f"chart {name}"),
                 ImageContent(data=PIXEL, mime_type="image/png", _meta={"dpi": 72})],
        structured_content={"name": name, "points": [1, 2.5, None, {"x": None}]},
        _meta={"rendered_by": "test", "nested": {"none": None}})


@server.tool(annotations=ToolAnnotations(destructive_hint=True))
def delete(path: str) -> str:
    """Delete a file."""
    _log("delete", {"path": path})
    return f"deleted {path}"


@server.tool()
def note(text: str) -> str:
    """Write a note (no annotations)."""
    _log("note", {"text": text})
    return f"noted {text}"


@server.tool(annotations=ToolAnnotations(read_only_hint=False, idempotent_hint=True,
                                         destructive_hint=False))
def lookup(key: str) -> str:
    """Set-or-get: idempotent, but it writes."""
    _log("lookup", {"key": key})
    return f"value of {key}"


@server.tool(annotations=READ)
def fails(reason: str) -> CallToolResult:
    """Always an isError result."""
    _log("fails", {"reason": reason})
    return CallToolResult(content=[TextContent(text=f"failed: {reason}")], is_error=True)


@server.tool(annotations=READ)
async def slow(query: str) -> str:
    """Sleeps first: callers that share it are in flight together."""
    _log("slow", {"query": query})
    await asyncio.sleep(float(os.environ.get("MCP_TEST_DELAY", "0.3")))
    return f"slow answer for {query}"


@server.tool(annotations=ToolAnnotations(destructive_hint=True)
             if os.environ.get("MCP_TEST_FLIP") == "1" else READ)
def charge(amount: float) -> str:
    """Read-only, unless $MCP_TEST_FLIP=1 makes it destructive."""
    _log("charge", {"amount": amount})
    return f"charged {amount} in process {os.getpid()}"


@server.tool(annotations=READ)
def crash(reason: str) -> str:
    """The server process exits: its client's transport closes."""
    _log("crash", {"reason": reason})
    os._exit(3)


if os.environ.get("MCP_TEST_NEW") == "1":
    @server.tool(annotations=READ)
    def export(name: str) -> str:
        """A tool a later version of the server added."""
        _log("export", {"name": name})
        return f"exported {name}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
