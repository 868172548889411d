"""What an MCP wrapper is given, and what it reaches: the server's session, opened on
demand (the first call that must run opens it, in a task of its own; a session whose server
died is opened again by the next call that must run; replay never gets here), the server's
name (default names without credentials: :mod:`._mcp_names`), the options checked."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.client import Client
from mcp.server import MCPServer, Server
from mcp.shared.exceptions import MCPError

from ..models import ToolExecutionOptions, check_text
from ._mcp_names import stdio_label, url_label

if TYPE_CHECKING:
    from .mcp import Core

_CONNECTION_CLOSED = -32000  # mcp_types.CONNECTION_CLOSED
FIXED = ("tool_name", "meter")  # set by the wrappers: mcp:<server>/<tool>
# What an unentered mcp.Client may be copied with for each connection (a transport opens once).
_REUSABLE = (StdioServerParameters, str, Server, MCPServer)


def connection_closed(exc: BaseException) -> bool:
    """Whether ``exc`` says the session's transport closed (the server exited or hung up)."""
    return isinstance(exc, MCPError) and exc.code == _CONNECTION_CLOSED and \
        "closed" in str(exc.error.message).lower()


class LoopLock:
    """An ``asyncio.Lock`` for the running loop (a wrapper may outlive one loop)."""

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock


class Connection:
    """The server's session, opened by the first call that needs it, in a task of its own:
    the transport's task group is entered and left by the same task, whichever call came
    first. An unentered ``mcp.Client`` is a template: each connection enters a copy of it (a
    ``Client`` enters once)."""

    def __init__(self, target: Any, core: Core) -> None:
        self._target, self._core = target, core
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._closed = False  # the session's transport closed: the next call opens another
        self._lock = LoopLock()
        self.owned = True
        if isinstance(target, ClientSession) or (isinstance(target, Client) and _entered(target)):
            self._session, self.owned = target, False  # the user's: never closed here
        elif isinstance(target, Client) and not isinstance(target.server, _REUSABLE):
            raise TypeError(
                f"receipt_mcp_client() cannot reconnect an mcp.Client built on a "
                f"{type(target.server).__name__} (a transport opens once): pass the "
                f"StdioServerParameters or URL itself, or a function returning a new Client")
        elif not (isinstance(target, Client | StdioServerParameters | str) or callable(target)):
            raise TypeError(f"receipt_mcp_client() takes a StdioServerParameters, a URL, an "
                            f"mcp.Client, a ClientSession, or a function returning an async "
                            f"context manager that yields one; got {type(target).__name__}")

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._closed

    async def run(self, what: str, refusal: tuple[str, str],
                  request: Callable[[Any], Awaitable[Any]]) -> Any:
        """``request(session)`` on the open session (opening it first if need be; in replay,
        ``refusal`` says why not and the fix); a request that finds the transport closed
        marks the session for reopening."""
        self._core.refuse_in_replay(what, *refusal)
        session = await self._get()
        try:
            return await request(session)
        except MCPError as exc:
            if connection_closed(exc) and self.owned and session is self._session:
                self._closed = True
            raise

    async def _get(self) -> Any:
        if not self.owned:
            return self._session
        loop = asyncio.get_running_loop()
        async with self._lock.get():
            task = self._task
            if self._session is None or self._loop is not loop or self._closed or (
                    task is not None and task.done()):
                if self._loop is loop:
                    await self.close()  # a server that died: its transport is left here
                self._session, self._closed = None, False  # one of another loop is no use here
                self._session = await self._open(loop)
                self._loop = loop
        return self._session

    def _enter(self) -> AbstractAsyncContextManager[Any]:
        target = self._target
        if isinstance(target, StdioServerParameters | str):
            return Client(target)
        if isinstance(target, Client):
            return dataclasses.replace(target)  # the same server and settings, unentered
        opened = target()
        if not hasattr(opened, "__aenter__"):
            raise TypeError(f"the connect function of MCP server {self._core.label!r} returned "
                            f"a {type(opened).__name__}, not an async context manager")
        return opened  # type: ignore[no-any-return]

    async def _open(self, loop: asyncio.AbstractEventLoop) -> Any:
        ready: asyncio.Future[Any] = loop.create_future()
        stop = asyncio.Event()

        async def hold() -> None:
            try:
                async with self._enter() as session:
                    ready.set_result(session)
                    await stop.wait()
            except BaseException as exc:
                if ready.done():
                    raise
                if isinstance(exc, asyncio.CancelledError):
                    ready.cancel()
                else:
                    ready.set_exception(exc)

        task = loop.create_task(hold(), name=f"mcp server {self._core.label}")
        try:
            session = await asyncio.shield(ready)
        except BaseException:
            stop.set()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        self._task, self._stop = task, stop
        return session

    async def close(self) -> None:
        task, stop = self._task, self._stop
        self._task = self._stop = None
        if self.owned:
            self._session = None
        if task is None or stop is None:
            return
        stop.set()
        if task.get_loop() is asyncio.get_running_loop():
            # A server that died has nothing to close; one that will not stop is left behind.
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(task, 30)


def _entered(client: Client) -> bool:
    try:
        client.session  # noqa: B018  (raises until the client is entered)
    except RuntimeError:
        return False
    return True


# -- what a wrapper is given, checked ------------------------------------------------------


def server_name(label: Any, wrapper: str) -> str:
    """The server's name, checked: one line of printable text UTF-8 can encode."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{wrapper}() needs a server name: pass name= (got {label!r})")
    check_text(label, f"{wrapper}() server name")
    if not label.isprintable():  # control characters, NEL, CSI, line and paragraph separators
        raise ValueError(f"{wrapper}() server name {label!r} holds a character that is not "
                         f"printable: pass name= a single line of printable text")
    return label


def checked_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Tool options the wrapper cannot take refused, and ``redact=`` checked by name."""
    options = dict(options)
    for fixed in FIXED:
        if fixed in options:
            raise TypeError(f"{where} sets {fixed} itself (mcp:<server>/<tool>); it cannot be "
                            f"given")
    _check_redact(options.get("redact"), where)
    return options


def _check_redact(redact: Any, where: str) -> None:
    if redact is not None and not callable(redact) and (
            isinstance(redact, str | bytes) or not isinstance(redact, Sequence | set | frozenset)
            or not all(isinstance(path, str) for path in redact)):
        raise TypeError(f"{where} redact= takes a list of argument names or dotted paths, or a "
                        f"function of the arguments; got {type(redact).__name__}")


def overrides(tools: Mapping[str, Mapping[str, Any]] | None, base: ToolExecutionOptions,
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
        for fixed in FIXED:
            if fixed in options:
                raise TypeError(f"{wrapper}() tools[{tool!r}]: {fixed} is set by the wrapper "
                                f"(mcp:<server>/<tool>); it cannot be given")
        _check_redact(options.get("redact"), f"{wrapper}() tools[{tool!r}]:")
        try:
            base.replace(**options)  # unknown names and bad values fail now
        except TypeError as exc:
            raise TypeError(f"{wrapper}() tools[{tool!r}]: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{wrapper}() tools[{tool!r}]: {exc}") from None
        checked[tool] = dict(options)
    return checked


def label_of(server: Any) -> str:
    if isinstance(server, Client):
        server = server.server
    if isinstance(server, StdioServerParameters):
        return stdio_label(server.command, server.args)
    if isinstance(server, str):
        return url_label(server)
    raise TypeError(f"receipt_mcp_client() cannot tell which server a {type(server).__name__} "
                    f"reaches: pass name=, the server's name in keys and reports")
