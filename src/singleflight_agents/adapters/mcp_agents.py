"""The OpenAI Agents SDK's MCP servers through receipts.

``receipt_mcp_server(sf, server, **options)`` wraps an ``agents.mcp.MCPServer``
(``MCPServerStdio``, ``MCPServerStreamableHttp``, ``MCPServerSse``, or one of your own) in an
object that is itself an ``agents.mcp.MCPServer``: ``Agent(mcp_servers=[wrapped])`` lists its
tools and calls them through receipts, as :mod:`.mcp` does for a ``ClientSession``. Its
``connect()`` connects nothing: the wrapped server is connected by the first call that needs it
(never in replay), and ``cleanup()`` closes what was opened.

The server's approval policy, failure handling, guardrails, meta resolver, structured content
setting and ``tool_filter`` stay in force. The wrapper records the server's whole listing (read
through the server's own listing path, its filter left out on a copy: the server itself is
never changed) and filters it for each agent with the server's ``tool_filter``, as the SDK
does.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from agents.exceptions import UserError
from agents.mcp import MCPServer, ToolFilterContext
from agents.run_context import RunContextWrapper
from mcp import StdioServerParameters
from mcp.types import (
    CallToolResult,
    GetPromptResult,
    ListPromptsResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    ListToolsResult,
    ReadResourceResult,
)
from mcp.types import Tool as MCPTool

from ._agents_compat import mcp_server_log_name, mcp_server_policies, set_mcp_server_policies
from ._mcp_connect import LoopLock, connection_closed
from ._mcp_names import stdio_label, text_label, url_label
from .mcp import PREFIX, RECORD, UNLISTED, Core, call_refused

if TYPE_CHECKING:
    from agents.agent import AgentBase

__all__ = ["ReceiptMCPServer", "receipt_mcp_server"]

_logger = logging.getLogger("openai.agents")
_NOT_RECORDED = ("prompts and resources are not recorded", RECORD)


def _label_of(server: MCPServer) -> str:
    """The name the user gave the server, else its command or URL (the SDK's default name
    holds the command without its arguments, or the URL with its credentials)."""
    name = server.name
    params = getattr(server, "params", None)
    if isinstance(params, StdioServerParameters) and name == f"stdio: {params.command}":
        return stdio_label(params.command, params.args)
    url = params.get("url") if isinstance(params, Mapping) else None
    if isinstance(url, str) and name in (f"streamable_http: {url}", f"sse: {url}"):
        return url_label(url)
    return text_label(mcp_server_log_name(name))


class ReceiptMCPServer(MCPServer):
    """An ``agents.mcp.MCPServer`` whose tools are listed and called through receipts; made by
    :func:`receipt_mcp_server`."""

    server: MCPServer  # the wrapped server

    def __init__(self, sf: Any, server: MCPServer, *, name: str | None,
                 tools: Mapping[str, Mapping[str, Any]] | None, listing_ttl: float,
                 options: Mapping[str, Any]) -> None:
        if isinstance(server, ReceiptMCPServer):
            server = server.server  # wrapping again wraps the original
        if not isinstance(server, MCPServer):
            raise TypeError(f"receipt_mcp_server() expected an agents.mcp.MCPServer, got "
                            f"{type(server).__name__}")
        super().__init__(use_structured_content=server.use_structured_content,
                         tool_meta_resolver=server.tool_meta_resolver,
                         custom_data_extractor=server.custom_data_extractor,
                         tool_input_guardrails=server.tool_input_guardrails,
                         tool_output_guardrails=server.tool_output_guardrails)
        # What the SDK asks the server about each tool, as the wrapped server answers it.
        set_mcp_server_policies(self, mcp_server_policies(server))
        self.server = server
        self._core = Core(sf, name if name is not None else _label_of(server), tools, options,
                          listing_ttl=listing_ttl, wrapper="receipt_mcp_server")
        self._tools: list[MCPTool] | None = None
        self._opened = False  # whether the wrapper connected the server (and cleans it up)
        self._loop: asyncio.AbstractEventLoop | None = None  # where it was connected
        self._closed = False  # its transport closed: the next call that must run reconnects
        self._connections = 0  # how many times the wrapper connected it: which one a call used
        self._lock = LoopLock()

    @property
    def tool_filter(self) -> Any:
        """The wrapped server's ``tool_filter``, applied to the recorded listing."""
        return getattr(self.server, "tool_filter", None)

    @property
    def name(self) -> str:
        """The wrapped server's name: the SDK shows it, and prefixes tools with it."""
        return self.server.name

    @property
    def label(self) -> str:
        """The server's name in keys and reports: ``mcp:<label>/<tool>``."""
        return self._core.label

    @property
    def connected(self) -> bool:
        """Whether the wrapper connected the server (never, in a replay that found every
        call's receipt)."""
        return self._opened

    async def connect(self) -> None:
        """Nothing yet: the server is connected by the first call that needs it."""

    async def cleanup(self) -> None:
        """Clean up the server, if the wrapper connected it."""
        if self._opened:
            self._opened = False
            await cast(Any, self.server).cleanup()  # untyped in the SDK

    async def _ensure(self, what: str, refusal: tuple[str, str]) -> None:
        self._core.refuse_in_replay(what, *refusal)
        loop = asyncio.get_running_loop()
        if self._opened and self._loop is loop and not self._closed:
            return
        async with self._lock.get():
            if self._opened and (self._loop is not loop or self._closed):
                await self.cleanup()  # connected on another loop, or its server died
            # A server connected by its owner before it was wrapped is used as it is.
            if not self._opened and getattr(self.server, "session", None) is None:
                await cast(Any, self.server).connect()
                self._opened, self._loop, self._closed = True, loop, False
                self._connections += 1

    async def _request(self, what: str, refusal: tuple[str, str],
                       request: Callable[[], Awaitable[Any]]) -> Any:
        """``request()`` on the connected server; one that finds the transport closed has the
        next call reconnect the server (if the wrapper connected it, and only if the request
        was sent on the current connection: a late failure from one that died, after another
        call reconnected, leaves the new one alone)."""
        await self._ensure(what, refusal)
        connection = self._connections
        try:
            return await request()
        except Exception as exc:
            if connection_closed(exc) and self._opened and connection == self._connections:
                self._closed = True
            raise

    async def _listing(self, run_context: RunContextWrapper[Any] | None,
                       agent: AgentBase | None) -> list[MCPTool]:
        async def send() -> ListToolsResult:
            tools = await self._request(self._core.listing.tool_name or "tools/list", UNLISTED,
                                        lambda: self._unfiltered(run_context, agent))
            return ListToolsResult(tools=tools)

        value = await self._core.list({"all_pages": True}, send)
        listed = value.get("tools", [])
        self._core.learn(listed)
        tools = [MCPTool.model_validate(tool) for tool in listed]
        self._tools = tools
        return tools

    async def _unfiltered(self, run_context: RunContextWrapper[Any] | None,
                          agent: AgentBase | None) -> list[MCPTool]:
        """The server's whole listing, through its own listing path (pages, retries, its
        cache): with a ``tool_filter``, on a shallow copy without it, the server untouched."""
        server = self.server
        if getattr(server, "tool_filter", None) is not None:
            server = copy.copy(server)
            server.tool_filter = None  # type: ignore[attr-defined]
        return await server.list_tools(run_context, agent)

    async def list_tools(self, run_context: RunContextWrapper[Any] | None = None,
                         agent: AgentBase | None = None) -> list[MCPTool]:
        """The server's tools through receipts, filtered by its ``tool_filter``."""
        return await self._filtered(await self._listing(run_context, agent), run_context, agent)

    async def call_tool(self, tool_name: str, arguments: dict[str, Any] | None,
                        meta: dict[str, Any] | None = None) -> CallToolResult:
        """A tool call through receipts; ``meta`` reaches the server when the call runs,
        unkeyed."""
        if self._core.annotations is None:
            await self._listing(None, None)
        options = self._core.options_for(tool_name)
        self._core.refuse_unlisted(tool_name, options)

        def request() -> Awaitable[CallToolResult]:
            if meta is None:
                return self.server.call_tool(tool_name, arguments)
            return self.server.call_tool(tool_name, arguments, meta=meta)

        async def send() -> CallToolResult:
            result: CallToolResult = await self._request(
                options.tool_name or tool_name, call_refused(tool_name), request)
            return result

        value = await self._core.call(options, self._core.identity(tool_name, arguments), send)
        return CallToolResult.model_validate(value)

    async def _filtered(self, tools: list[MCPTool], run_context: RunContextWrapper[Any] | None,
                        agent: AgentBase | None) -> list[MCPTool]:
        """The SDK's filtering (agents 0.24): an allow list and a block list, or a function
        of the context and a copy of the tool; a function that raises excludes the tool."""
        rule = self.tool_filter
        if rule is None:
            return tools
        if isinstance(rule, Mapping):
            if "allowed_tool_names" in rule:
                tools = [t for t in tools if t.name in rule["allowed_tool_names"]]
            if "blocked_tool_names" in rule:
                tools = [t for t in tools if t.name not in rule["blocked_tool_names"]]
            return tools
        if run_context is None or agent is None:
            raise UserError("run_context and agent are required for dynamic tool filtering")
        context = ToolFilterContext(run_context=run_context, agent=agent, server_name=self.name)
        kept = []
        for tool in tools:
            try:
                keep = rule(context, tool.model_copy(deep=True))
                if inspect.isawaitable(keep):
                    keep = await keep
            except Exception:
                _logger.exception("Error applying MCP tool filter")
                continue
            if keep:
                kept.append(tool)
        return kept

    @property
    def cached_tools(self) -> list[MCPTool] | None:
        """The last listing (unfiltered), as copies."""
        return None if self._tools is None else [t.model_copy(deep=True) for t in self._tools]

    def invalidate_tools_cache(self) -> None:
        """Forget the listing read: the next is read again (outside replay, from the server,
        and stored in place of its receipt unless that is at most ``listing_ttl`` old)."""
        self._tools = None
        self._core.forget()
        invalidate = getattr(self.server, "invalidate_tools_cache", None)
        if callable(invalidate):
            invalidate()

    # Prompts and resources reach the server itself (connecting it if need be); never in replay.

    async def _unrecorded(self, method: str, request: Callable[[], Awaitable[Any]]) -> Any:
        return await self._request(f"{PREFIX}{self.label}:{method}", _NOT_RECORDED, request)

    async def list_prompts(self) -> ListPromptsResult:
        result: ListPromptsResult = await self._unrecorded("prompts/list", self.server.list_prompts)
        return result

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None) -> GetPromptResult:
        result: GetPromptResult = await self._unrecorded(
            "prompts/get", lambda: self.server.get_prompt(name, arguments))
        return result

    async def list_resources(self, cursor: str | None = None) -> ListResourcesResult:
        result: ListResourcesResult = await self._unrecorded(
            "resources/list", lambda: self.server.list_resources(cursor))
        return result

    async def list_resource_templates(self, cursor: str | None = None) -> ListResourceTemplatesResult:
        result: ListResourceTemplatesResult = await self._unrecorded(
            "resources/templates/list", lambda: self.server.list_resource_templates(cursor))
        return result

    async def read_resource(self, uri: str) -> ReadResourceResult:
        result: ReadResourceResult = await self._unrecorded(
            "resources/read", lambda: self.server.read_resource(uri))
        return result

    async def __aenter__(self) -> ReceiptMCPServer:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()


def receipt_mcp_server(sf: Any, server: MCPServer, /, *, name: str | None = None,
                       tools: Mapping[str, Mapping[str, Any]] | None = None,
                       listing_ttl: float = 0, **options: Any) -> ReceiptMCPServer:
    """``server`` (an ``agents.mcp.MCPServer``) with its tools listed and called through
    ``sf`` (an engine or the pytest fixture), connected only when a call must run.

    ``name`` is the server's name in keys and reports (default: the name given to the SDK's
    server, else its command and arguments or its URL, with credentials masked). ``tools``,
    ``listing_ttl`` and the other keywords are as for
    :func:`~singleflight_agents.adapters.receipt_mcp_client`: flags come from the tools'
    annotations (read from the server and stored in record mode), ``tools=`` overrides them
    per tool.
    """
    return ReceiptMCPServer(sf, server, name=name, tools=tools, listing_ttl=listing_ttl,
                            options=options)
