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
``mcp:<server>:tools/list`` (outside replay, read from the server and stored anew by the first
listing each wrapper needs, unless ``listing_ttl=`` trusts a recent receipt; replay follows the
stored one). A result is stored as its JSON (wire names, exactly the fields the
server sent) and rebuilt with ``model_validate``; an ``isError`` result reaches its callers but
is never stored. The server is started or contacted only by a call that must run, never in
replay. This module imports ``mcp``, never ``agents``.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from mcp.client.client import Client
from mcp.types import CallToolResult, ListToolsResult, PaginatedRequestParams

from ..engine import Singleflight
from ..models import ReplayMissError, SingleflightError, ToolExecutionOptions
from ..sessions import report_miss
from ._mcp_connect import Connection, checked_options, label_of, overrides, server_name

__all__ = ["ReceiptMCPClient", "receipt_mcp_client"]

PREFIX = "mcp:"
_MAX_PAGES = 100
RECORD = "run it in record mode"
UNLISTED = ("its tool listing has no receipt", RECORD)
UNKNOWN_TOOL = ("its recorded tool listing does not list {tool!r}",
                "re-record with --singleflight-mode=record, which stores the server's listing "
                "as it is now (--singleflight-mode=refresh if listing_ttl= is set)")
Send = Callable[[], Awaitable[Any]]


class _NotStored(Exception):
    """An ``isError`` result: it reaches every caller of its flight, and is never kept."""

    def __init__(self, value: dict[str, Any]) -> None:
        super().__init__("an MCP tool result with isError")
        self.value = value


class ServerNotStarted(ReplayMissError):
    """Replay reached a call only the MCP server could answer: replay never starts or
    contacts a server. A :class:`ReplayMissError`, so the pytest plugin fails the test."""

    def __init__(self, what: str, server: str, why: str, fix: str = RECORD) -> None:
        SingleflightError.__init__(
            self, f"{what}: replay never starts or contacts MCP server {server!r}, and {why}; "
                  f"{fix}")
        self.tool_name = what
        self.inputs = ""


def call_refused(tool: str) -> tuple[str, str]:
    """Why replay refuses a call that reached the server, and the fix."""
    return ("this call can only run there (a side-effecting call runs in every mode)",
            f"{RECORD}, or, if a recorded answer may stand in for it, give it tools="
            f"{{{tool!r}: {{'side_effecting': False, 'deterministic': True}}}}")


def dump(model: Any) -> dict[str, Any]:
    """A result as its wire JSON: aliases, and only the fields the server sent."""
    value: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return value


async def _run_call(send: Send) -> dict[str, Any]:
    value = dump(await send())
    if value.get("isError"):
        raise _NotStored(value)
    return value


async def _run_listing(send: Send) -> dict[str, Any]:
    return dump(await send())


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
                 options: Mapping[str, Any], *, listing_ttl: float, wrapper: str) -> None:
        options = checked_options(options, f"{wrapper}()")
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
        self.label = server_name(label, wrapper)
        self.wrapper = wrapper
        self.sf = sf
        self.base = base
        self.overrides = overrides(tools, base, wrapper)
        if isinstance(listing_ttl, bool) or not isinstance(listing_ttl, int | float) or not (
                0 <= listing_ttl <= 315_360_000):
            raise ValueError(f"{wrapper}() listing_ttl= must be a number of seconds from 0 to "
                             f"315360000 (10 years), got {listing_ttl!r}")
        self.listing_ttl = float(listing_ttl)
        # Kept as long as any call's receipt: replay needs the listing to replay a call.
        ttl = max([base.ttl_seconds, *(base.replace(**o).ttl_seconds
                                       for o in self.overrides.values())])
        # Outside replay, read from the server unless the receipt is at most listing_ttl old.
        self.listing = base.replace(
            tool_name=f"{PREFIX}{self.label}:tools/list", key=None, redact=None,
            deterministic=False, bounded_read=True, side_effecting=False, estimated_cost_usd=0.0,
            ttl_seconds=ttl, max_age_seconds=self.listing_ttl)
        self.annotations: dict[str, Any] | None = None  # by tool, once a listing was read
        self.defaults: dict[str, dict[str, Any]] = {}  # by tool: its schema's defaults
        self._options: dict[str, ToolExecutionOptions] = {}
        self._keys: dict[str, Callable[..., Any] | None] = {}  # by tool: its key=
        self._fresh: set[str] = set()  # listing pages this wrapper read since it forgot

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

    def forget(self) -> None:
        """Read the listing again: from the server, in record mode."""
        self._fresh.clear()
        self.annotations = None

    def options_for(self, tool: str) -> ToolExecutionOptions:
        """The options of ``tool``'s calls: the wrapper's, its annotations' flag, then its
        ``tools=`` entry."""
        found = self._options.get(tool)
        if found is None:
            annotations = (self.annotations or {}).get(tool)
            options = self.base.replace(**flags_of(annotations)).replace(
                **self.overrides.get(tool, {}))
            self._keys[tool] = options.key
            found = options.replace(tool_name=f"{PREFIX}{self.label}/{tool}", key=None,
                                    redact=_under_arguments(options.redact))
            self._options[tool] = found
        return found

    def identity(self, tool: str, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
        """What a call is keyed on: its arguments, where an omitted argument with a default in
        the tool's schema is the same call as one that gives the default (or what the tool's
        ``key=`` makes of them). Call :meth:`options_for` first."""
        given = {**self.defaults.get(tool, {}), **(arguments or {})}
        user_key = self._keys.get(tool)
        return {"arguments": given if user_key is None else user_key(**given)}

    def mode(self) -> str:
        return self.engine.current_mode()

    def refuse_in_replay(self, what: str, why: str, fix: str = RECORD) -> None:
        """In replay, a :class:`ServerNotStarted` (also listed in the open scope), before
        anything reaches the server."""
        if self.mode() == "replay":
            raise report_miss(ServerNotStarted(what, self.label, why, fix))

    async def list(self, page: dict[str, Any], send: Send) -> dict[str, Any]:
        """One listing page through receipts. Outside replay, the first read of each page in
        a wrapper (since :meth:`forget`) takes a receipt only if it is at most ``listing_ttl``
        old: else it reads the server and stores what it says, for replay to follow. Later
        reads take the receipt: the flags stay those the wrapper learned."""
        which = json.dumps(page, sort_keys=True)
        options = self.listing if which not in self._fresh else self.listing.replace(
            max_age_seconds=None)
        outcome = await self.sf.do(options.tool_name or "", page,
                                   functools.partial(_run_listing, send), options=options)
        if self.mode() != "replay":
            self._fresh.add(which)
        value: dict[str, Any] = outcome.value
        return value

    def refuse_unlisted(self, tool: str, options: ToolExecutionOptions) -> None:
        """In replay, a tool the recorded listing does not name, with no flag from ``tools=``
        either, is refused naming the fix: a record run stores the server's listing anew."""
        if self.annotations is not None and tool not in self.annotations and not (
                options.shared or options.side_effecting):
            self.refuse_in_replay(options.tool_name or tool, UNKNOWN_TOOL[0].format(tool=tool),
                                  UNKNOWN_TOOL[1])

    async def call(self, options: ToolExecutionOptions, identity: dict[str, Any],
                   send: Send) -> dict[str, Any]:
        try:
            outcome = await self.sf.do(options.tool_name or "", identity,
                                       functools.partial(_run_call, send), options=options)
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


# -- the client ------------------------------------------------------------------------------


class ReceiptMCPClient:
    """An MCP server's tools through receipts, with ``ClientSession``'s ``call_tool`` and
    ``list_tools``. Made by :func:`receipt_mcp_client`; close it (``async with``, or
    :meth:`close`) to stop a server it started."""

    def __init__(self, sf: Any, server: Any, *, name: str | None,
                 tools: Mapping[str, Mapping[str, Any]] | None, listing_ttl: float,
                 options: Mapping[str, Any]) -> None:
        label = name if name is not None else label_of(server)
        self._core = Core(sf, label, tools, options, listing_ttl=listing_ttl,
                          wrapper="receipt_mcp_client")
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
        self._core.refuse_unlisted(name, options)
        extra: dict[str, Any] = {"meta": meta} if meta is not None else {}
        if read_timeout_seconds is not None:
            extra["read_timeout_seconds"] = read_timeout_seconds
        if progress_callback is not None:
            extra["progress_callback"] = progress_callback

        async def send() -> Any:
            return await self._connection.run(
                options.tool_name or name, call_refused(name),
                lambda session: session.call_tool(name, arguments, **extra))

        value = await self._core.call(options, self._core.identity(name, arguments), send)
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
        async def request(session: Any) -> Any:
            if isinstance(session, Client):
                return await session.list_tools(cursor=cursor)
            if cursor is None:
                return await session.list_tools()
            return await session.list_tools(params=PaginatedRequestParams(cursor=cursor))

        async def send() -> Any:
            return await self._connection.run(self._core.listing.tool_name or "tools/list",
                                              UNLISTED, request)

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
                       listing_ttl: float = 0, **options: Any) -> ReceiptMCPClient:
    """An MCP server's ``call_tool`` and ``list_tools`` through ``sf`` (an engine or the
    pytest fixture), connecting only when a call must run.

    ``server`` is a ``StdioServerParameters`` or a streamable-HTTP URL (opened with
    ``mcp.Client``), an ``mcp.Client``, a function returning an async context manager that
    yields a connected session, or a connected ``ClientSession`` (then replay sends it
    nothing; an unentered ``mcp.Client`` is a template, copied for each connection, so one
    built on a transport object, which opens once, is refused). ``name`` is the server's name
    in keys and reports (default: the command's file name and arguments, or the URL, with
    credentials masked, see :mod:`._mcp_names`; a session or function needs one).
    ``tools`` gives per-tool options over the annotations' flags, e.g. ``{"search":
    {"bounded_read": True, "ttl": 60}, "delete": {"side_effecting": True}}``.
    ``listing_ttl`` is how many seconds a recorded listing stands for the server outside
    replay (default 0: the first listing each wrapper needs is read from the server and
    stored, so the flags are the server's as it is now, and replay, which always uses the
    stored listing, follows the last record run). Other keywords
    are :class:`ToolExecutionOptions` fields for every tool (``key=`` and ``redact=`` see the
    tool's arguments).
    """
    return ReceiptMCPClient(sf, server, name=name, tools=tools, listing_ttl=listing_ttl,
                            options=options)
