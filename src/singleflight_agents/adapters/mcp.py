"""MCP tools through receipts: an MCP server's ``call_tool`` and ``list_tools`` recorded,
shared in flight and replayed, so an eval suite replays without its tool servers.

``receipt_mcp_client(sf, server, name=..., tools=..., **options)`` wraps what reaches a server
through the ``mcp`` package: a ``StdioServerParameters`` or a URL (connected through
``mcp.Client`` on the first call that needs the server), an ``mcp.Client``, a function
returning an async context manager that yields a connected session, or a connected
``ClientSession``. The Agents SDK's server objects: :mod:`.mcp_agents`.

A call is one engine call of the tool ``mcp:<server>/<tool>``, keyed on its arguments in
canonical form (never on JSON-RPC ids, session ids or ``_meta``). Its flags come from the
tool's annotations (``readOnlyHint`` -> ``bounded_read``, else ``destructiveHint`` ->
``side_effecting``, else not shared), read from the server's listing, itself recorded as
``mcp:<server>:tools/list``. A result is stored as its JSON (wire names, exactly the fields the
server sent) and rebuilt with ``model_validate``; an ``isError`` result reaches its callers but
is never stored. The server is started or contacted only by a call that must run, never in
replay. This module imports ``mcp``, never ``agents``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from mcp import StdioServerParameters
from mcp.client.client import Client
from mcp.types import CallToolResult, ListToolsResult, PaginatedRequestParams

from ..engine import Singleflight
from ..models import ReplayMissError, SingleflightError, ToolExecutionOptions, check_text
from ..sessions import active_session
from ._mcp_connect import Connection

__all__ = ["ReceiptMCPClient", "receipt_mcp_client"]

PREFIX = "mcp:"
_FIXED = ("tool_name", "meter")
_MAX_PAGES = 100
_CREDENTIAL = re.compile(r"key|token|secret|passw|auth|credential|cookie", re.IGNORECASE)
Send = Callable[[], Awaitable[Any]]


class _NotStored(Exception):
    """An ``isError`` result: it reaches every caller of its flight, and is never kept."""

    def __init__(self, value: dict[str, Any]) -> None:
        super().__init__("an MCP tool result with isError")
        self.value = value


class ServerNotStarted(ReplayMissError):
    """Replay reached a call only the MCP server could answer: replay never starts or
    contacts a server. A :class:`ReplayMissError`, so the pytest plugin fails the test."""

    def __init__(self, what: str, server: str, why: str) -> None:
        SingleflightError.__init__(
            self, f"{what}: replay never starts or contacts MCP server {server!r}, and {why}; "
                  f"run it in record mode, or give the tool deterministic=True or "
                  f"bounded_read=True (tools=...) if its answer may be replayed")
        self.tool_name = what
        self.inputs = ""


class _Invocation:
    """The engine's first argument: how to reach the server, never keyed."""

    __slots__ = ("send",)

    def __init__(self, send: Send) -> None:
        self.send = send


def dump(model: Any) -> dict[str, Any]:
    """A result as its wire JSON: aliases, and only the fields the server sent."""
    value: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return value


# The engine runs these module-level functions (it caches what it learns about a callable: a
# per-call closure must not stay alive in that cache); ``arguments`` and ``page`` are the key.
async def _run_call(invocation: _Invocation, arguments: Any) -> dict[str, Any]:
    value = dump(await invocation.send())
    if value.get("isError"):
        raise _NotStored(value)
    return value


async def _run_listing(invocation: _Invocation, page: Any) -> dict[str, Any]:
    return dump(await invocation.send())


def _listing_key(invocation: _Invocation, page: Any) -> Any:
    return page


def _call_key(user_key: Callable[..., Any] | None) -> Callable[..., Any]:
    def key(invocation: _Invocation, arguments: Any) -> Any:
        return {"arguments": arguments if user_key is None else user_key(**arguments)}

    return key


def _under_arguments(redact: Any) -> Any:
    """``redact=`` paths name the tool's arguments: they lead into the engine's ``arguments``;
    a function of the arguments gets them, not the engine's key."""
    if redact is None:
        return None
    if callable(redact):
        return lambda keyed: redact(keyed["arguments"])
    return tuple(f"arguments.{path}" for path in redact)


def flags_of(annotations: Mapping[str, Any] | None) -> dict[str, bool]:
    """The safety flag a tool's annotations (wire names) declare: ``readOnlyHint`` is a read,
    else ``destructiveHint`` a side effect; anything else (``idempotentHint`` alone: repeatable
    is not the same answer) declares none."""
    if not annotations:
        return {}
    if annotations.get("readOnlyHint") is True:
        return {"bounded_read": True}
    if annotations.get("destructiveHint") is True:
        return {"side_effecting": True}
    return {}


class Core:
    """What both wrappers share: the server's name, each tool's options, the engine calls."""

    def __init__(self, sf: Any, label: str, tools: Mapping[str, Mapping[str, Any]] | None,
                 options: Mapping[str, Any], *, wrapper: str) -> None:
        options = dict(options)
        for fixed in _FIXED:
            if fixed in options:
                raise TypeError(f"{wrapper}() sets {fixed} itself (mcp:<server>/<tool>); it "
                                f"cannot be given")
        fixture_options = getattr(sf, "options", None)
        if isinstance(sf, Singleflight):
            base = ToolExecutionOptions().replace(**options)
            self.engine = sf
        elif callable(fixture_options):  # the pytest fixture: its marker and hooks apply
            base = fixture_options(_run_call, **options)
            self.engine = sf.engine
        else:
            raise TypeError(f"{wrapper}() expected a Singleflight engine or the singleflight "
                            f"fixture, got {type(sf).__name__}")
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{wrapper}() needs a server name: pass name= (got {label!r})")
        self.label = check_text(label, f"{wrapper}() server name")
        self.wrapper = wrapper
        self.sf = sf
        self.base = base
        self.overrides = _overrides(tools, base, wrapper)
        self.listing = base.replace(
            tool_name=f"{PREFIX}{self.label}:tools/list", key=_listing_key, redact=None,
            deterministic=False, bounded_read=True, side_effecting=False, estimated_cost_usd=0.0)
        self.annotations: dict[str, Any] | None = None  # by tool, once a listing was read
        self.defaults: dict[str, dict[str, Any]] = {}  # by tool: its schema's defaults
        self._options: dict[str, ToolExecutionOptions] = {}

    def learn(self, tools: Sequence[Any]) -> None:
        """Take each tool's annotations from a whole listing (wire names)."""
        named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
        self.annotations = {t["name"]: t.get("annotations") for t in named}
        self.defaults = {t["name"]: _defaults(t.get("inputSchema")) for t in named}
        self._options.clear()
        unknown = sorted(set(self.overrides) - set(self.annotations))
        if unknown:
            warnings.warn(f"{self.wrapper}(): tools= names {', '.join(map(repr, unknown))}, "
                          f"which MCP server {self.label!r} does not list", RuntimeWarning,
                          stacklevel=3)

    def options_for(self, tool: str) -> ToolExecutionOptions:
        """The options of ``tool``'s calls: the wrapper's, its annotations' flag, then its
        ``tools=`` entry."""
        found = self._options.get(tool)
        if found is None:
            annotations = (self.annotations or {}).get(tool)
            options = self.base.replace(**flags_of(annotations)).replace(
                **self.overrides.get(tool, {}))
            found = options.replace(tool_name=f"{PREFIX}{self.label}/{tool}",
                                    key=_call_key(options.key),
                                    redact=_under_arguments(options.redact))
            self._options[tool] = found
        return found

    def keyed(self, tool: str, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
        """The arguments as keyed: an omitted argument with a default in the tool's schema is
        the same call as one that gives the default."""
        return {**self.defaults.get(tool, {}), **(arguments or {})}

    def mode(self) -> str:
        return self.engine.current_mode()

    def refuse_in_replay(self, what: str, why: str) -> None:
        """In replay, a :class:`ServerNotStarted` (also listed in the open scope), before
        anything reaches the server."""
        if self.mode() == "replay":
            error = ServerNotStarted(what, self.label, why)
            session = active_session()
            if session is not None:
                session.missed(error)  # fails its test even if the agent swallows it
            raise error

    async def list(self, page: dict[str, Any], send: Send) -> dict[str, Any]:
        outcome = await self.sf.execute(_run_listing, _Invocation(send), page,
                                        options=self.listing)
        value: dict[str, Any] = outcome.value
        return value

    async def call(self, options: ToolExecutionOptions, arguments: dict[str, Any],
                   send: Send) -> dict[str, Any]:
        try:
            outcome = await self.sf.execute(_run_call, _Invocation(send), arguments,
                                            options=options)
        except _NotStored as failed:
            return failed.value
        value: dict[str, Any] = outcome.value
        return value


def _defaults(schema: Any) -> dict[str, Any]:
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {name: spec["default"] for name, spec in properties.items()
            if isinstance(spec, dict) and "default" in spec}


def _overrides(tools: Mapping[str, Mapping[str, Any]] | None, base: ToolExecutionOptions,
               wrapper: str) -> dict[str, dict[str, Any]]:
    """``tools=`` checked now: each entry a mapping of tool options, unknown names refused."""
    if tools is None:
        return {}
    if not isinstance(tools, Mapping):
        raise TypeError(f"{wrapper}() tools= takes a mapping of tool name to options, like "
                        f"{{'search': {{'bounded_read': True}}}}; got {type(tools).__name__}")
    checked: dict[str, dict[str, Any]] = {}
    for tool, options in tools.items():
        if not isinstance(tool, str) or not isinstance(options, Mapping):
            raise TypeError(f"{wrapper}() tools=: {tool!r} must be a tool name mapped to a "
                            f"mapping of options, got {type(options).__name__}")
        for fixed in _FIXED:
            if fixed in options:
                raise TypeError(f"{wrapper}() tools[{tool!r}]: {fixed} is set by the wrapper "
                                f"(mcp:<server>/<tool>); it cannot be given")
        try:
            base.replace(**options)  # unknown names and bad values fail now
        except TypeError as exc:
            raise TypeError(f"{wrapper}() tools[{tool!r}]: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{wrapper}() tools[{tool!r}]: {exc}") from None
        checked[tool] = dict(options)
    return checked


# -- server names ---------------------------------------------------------------------------


def stdio_label(command: str, args: Sequence[str]) -> str:
    """``stdio:<command's file name> <args>``, values of credential-like flags masked."""
    shown, hide_next = [os.path.basename(command)], False
    for arg in args:
        flag, equals, _ = arg.partition("=")
        if hide_next:
            shown.append("<redacted>")
            hide_next = False
        elif flag.startswith("-") and _CREDENTIAL.search(flag):
            shown.append(f"{flag}=<redacted>" if equals else arg)
            hide_next = not equals
        else:
            shown.append(arg)
    return "stdio:" + " ".join(shown)


def url_label(url: str) -> str:
    """The URL without credentials: no user part, query or fragment."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"MCP server URL {url!r} is not an http(s) URL")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _label_of(server: Any) -> str:
    if isinstance(server, Client):
        server = server.server
    if isinstance(server, StdioServerParameters):
        return stdio_label(server.command, server.args)
    if isinstance(server, str):
        return url_label(server)
    raise TypeError(f"receipt_mcp_client() cannot tell which server a {type(server).__name__} "
                    f"reaches: pass name=, the server's name in keys and reports")


# -- the client ------------------------------------------------------------------------------


class ReceiptMCPClient:
    """An MCP server's tools through receipts, with ``ClientSession``'s ``call_tool`` and
    ``list_tools``. Made by :func:`receipt_mcp_client`; close it (``async with``, or
    :meth:`close`) to stop a server it started."""

    def __init__(self, sf: Any, server: Any, *, name: str | None,
                 tools: Mapping[str, Mapping[str, Any]] | None, options: Mapping[str, Any]) -> None:
        label = name if name is not None else _label_of(server)
        self._core = Core(sf, label, tools, options, wrapper="receipt_mcp_client")
        self._connection = Connection(server, self._core)

    @property
    def name(self) -> str:
        """The server's name in keys and reports: ``mcp:<name>/<tool>``."""
        return self._core.label

    @property
    def connected(self) -> bool:
        """Whether a session to the server is open (never, in a replay that found every
        call's receipt)."""
        return self._connection.connected

    async def list_tools(self, cursor: str | None = None, *,
                         params: PaginatedRequestParams | None = None) -> ListToolsResult:
        """One page of the server's tools (``cursor=`` or ``params=`` as ``ClientSession`` and
        ``mcp.Client`` take it), through receipts."""
        if cursor is None and params is not None:
            cursor = params.cursor
        value = await self._page(cursor)
        if cursor is None and not value.get("nextCursor"):
            self._core.learn(value.get("tools", []))
        return ListToolsResult.model_validate(value)

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None,
                        read_timeout_seconds: float | None = None, progress_callback: Any = None,
                        *, meta: dict[str, Any] | None = None) -> CallToolResult:
        """``ClientSession.call_tool`` through receipts; ``read_timeout_seconds``,
        ``progress_callback`` and ``meta`` reach the server when the call runs, unkeyed."""
        options = await self.tool_options(name)
        extra: dict[str, Any] = {"meta": meta} if meta is not None else {}
        if read_timeout_seconds is not None:
            extra["read_timeout_seconds"] = read_timeout_seconds
        if progress_callback is not None:
            extra["progress_callback"] = progress_callback

        async def send() -> Any:
            session = await self._connection.get(options.tool_name or name)
            return await session.call_tool(name, arguments, **extra)

        value = await self._core.call(options, self._core.keyed(name, arguments), send)
        return CallToolResult.model_validate(value)

    async def tool_options(self, name: str) -> ToolExecutionOptions:
        """The options ``name``'s calls run with (its flags from the server's annotations,
        listed through receipts the first time)."""
        if self._core.annotations is None:
            await self._learn()
        return self._core.options_for(name)

    async def _learn(self) -> None:
        tools: list[Any] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            value = await self._page(cursor)
            tools += value.get("tools", [])
            cursor = value.get("nextCursor")
            if not cursor:
                break
        self._core.learn(tools)

    async def _page(self, cursor: str | None) -> dict[str, Any]:
        async def send() -> Any:
            session = await self._connection.get(self._core.listing.tool_name or "tools/list")
            if isinstance(session, Client):
                return await session.list_tools(cursor=cursor)
            if cursor is None:
                return await session.list_tools()
            return await session.list_tools(params=PaginatedRequestParams(cursor=cursor))

        return await self._core.list({"cursor": cursor}, send)

    async def close(self) -> None:
        """Stop the session this client opened (a session it was given stays open)."""
        await self._connection.close()

    async def __aenter__(self) -> ReceiptMCPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def receipt_mcp_client(sf: Any, server: Any, /, *, name: str | None = None,
                       tools: Mapping[str, Mapping[str, Any]] | None = None,
                       **options: Any) -> ReceiptMCPClient:
    """An MCP server's ``call_tool`` and ``list_tools`` through ``sf`` (an engine or the
    pytest fixture), connecting only when a call must run.

    ``server`` is a ``StdioServerParameters`` or a streamable-HTTP URL (opened with
    ``mcp.Client``), an ``mcp.Client``, a function returning an async context manager that
    yields a connected session, or a connected ``ClientSession`` (then replay sends it
    nothing). ``name`` is the server's name in keys and reports (default: the command's file
    name and arguments, or the URL without credentials; a session or function needs one).
    ``tools`` gives per-tool options over the annotations' flags, e.g. ``{"search":
    {"bounded_read": True, "ttl": 60}, "delete": {"side_effecting": True}}``. Other keywords
    are :class:`ToolExecutionOptions` fields for every tool (``key=`` and ``redact=`` see the
    tool's arguments).
    """
    return ReceiptMCPClient(sf, server, name=name, tools=tools, options=options)
