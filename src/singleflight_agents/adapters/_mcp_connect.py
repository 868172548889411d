"""What an MCP wrapper is given, and what it reaches: the server's session, opened on
demand (the first call that must run opens it, in a task of its own; a session whose server
died is opened again by the next call that must run; replay never gets here), the server's
name without credentials (:func:`stdio_label`, :func:`url_label`), the options checked."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mcp import ClientSession, StdioServerParameters
from mcp.client.client import Client
from mcp.shared.exceptions import MCPError

from ..models import ToolExecutionOptions, check_text

if TYPE_CHECKING:
    from .mcp import Core

_CONNECTION_CLOSED = -32000  # mcp_types.CONNECTION_CLOSED
FIXED = ("tool_name", "meter")  # set by the wrappers: mcp:<server>/<tool>


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


# -- server names: what a target reaches, without its credentials ------------------------------

REDACTED = "<redacted>"
_CREDENTIAL = re.compile(r"key|token|secret|passw|pwd|auth|credential|cookie|bearer", re.IGNORECASE)
_KEY_PREFIX = re.compile(r"(?:sk|pk|rk)[-_]|gh[opusr]_|github_pat_|xox[a-z]-|AIza|glpat-|AKIA|ASIA|"
                         r"hf_|npm_|ya29\.|eyJ|shpat_|SG\.")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_HEADER = re.compile(r"([A-Za-z][\w-]*):(\s*)(\S.*)", re.DOTALL)
_PIECES = re.compile(r"([/=:@?&#,;\s]+)")
_ENV_FLAGS, _HEADER_FLAGS = frozenset({"-e", "--env"}), frozenset({"-H", "--header"})


def _random_looking(piece: str) -> bool:
    """A known key prefix, or 20+ characters switching between lower case, upper case and
    digits as often as random text does (words and version strings seldom do)."""
    if len(piece) >= 10 and _KEY_PREFIX.match(piece):
        return True
    if len(piece) < 20 or not re.fullmatch(r"[A-Za-z0-9_-]+", piece):
        return False
    kinds = ["a" if c.islower() else "A" if c.isupper() else "0" if c.isdigit() else "-"
             for c in piece]
    return sum(a != b for a, b in itertools.pairwise(kinds)) >= 0.4 * (len(piece) - 1)


def _tokens(text: str) -> str:
    """``text`` with each key-like piece between separators masked."""
    return "".join(REDACTED if _random_looking(p) else p for p in _PIECES.split(text))


def _url(url: str) -> str:
    """A URL without its user part, query and fragment, key-like path segments masked."""
    try:
        parts = urlsplit(url)
        host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return REDACTED
    return f"{parts.scheme}://{host or ''}{port}{_tokens(parts.path)}"


def _header(value: str) -> str:
    found = _HEADER.fullmatch(value)
    return f"{found.group(1)}: {REDACTED}" if found else REDACTED


def _env(value: str) -> str:
    name, equals, _ = value.partition("=")
    return f"{_tokens(name)}={REDACTED}" if equals else _tokens(value)


def _argument(arg: str) -> str:
    """One argument, masked: a credential-like ``NAME=value``'s value, a header's value, and
    what :func:`_text` masks."""
    name, equals, value = arg.partition("=")
    if equals and "://" not in name:
        if name in _ENV_FLAGS:
            return f"{name}={_env(value)}"
        if name in _HEADER_FLAGS:
            return f"{name}={_header(value)}"
        if _CREDENTIAL.search(name):
            return f"{name}={REDACTED}"
    header = _HEADER.fullmatch(arg)
    if header and "://" not in arg and (header.group(2) or _CREDENTIAL.search(header.group(1))):
        return _header(arg)  # "Authorization: Bearer ..."
    return _text(arg)


def text_label(text: str) -> str:
    """``text`` with URLs without user part, query or fragment, and key-like pieces masked."""
    return _text(text)


def _text(text: str) -> str:
    """URLs without user part, query or fragment; key-like pieces masked."""
    return "".join(_url(part) if odd else _tokens(part)
                   for odd, part in _alternate(re.split(f"({_URL.pattern})", text)))


def _alternate(parts: list[str]) -> Iterator[tuple[bool, str]]:
    return ((index % 2 == 1, part) for index, part in enumerate(parts))


def stdio_label(command: str, args: Sequence[str]) -> str:
    """``stdio:<command's file name> <args>``, without credentials: the value after a flag
    with a credential-like name, ``-e``/``--env`` values, ``-H``/``--header`` values, and
    what :func:`_argument` masks in each argument."""
    shown, follows = [_tokens(os.path.basename(command))], ""
    for arg in args:
        if follows == "env":
            shown.append(_env(arg))
        elif follows == "header":
            shown.append(_header(arg))
        elif follows == "value":
            shown.append(REDACTED)
        else:
            shown.append(_argument(arg))
        follows = "" if follows else _what_follows(arg)
    return "stdio:" + " ".join(shown)


def _what_follows(arg: str) -> str:
    if arg in _ENV_FLAGS:
        return "env"
    if arg in _HEADER_FLAGS:
        return "header"
    if arg.startswith("-") and "=" not in arg and _CREDENTIAL.search(arg):
        return "value"
    return ""


def url_label(url: str) -> str:
    """The URL without credentials: no user part, query or fragment, key-like path segments
    masked."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"MCP server URL {_url(url)!r} is not an http(s) URL")
    return _url(url)


# -- what a wrapper is given, checked ------------------------------------------------------


def server_name(label: Any, wrapper: str) -> str:
    """The server's name, checked: one line of text UTF-8 can encode."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{wrapper}() needs a server name: pass name= (got {label!r})")
    check_text(label, f"{wrapper}() server name")
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise ValueError(f"{wrapper}() server name {label!r} holds a control character: pass "
                         f"name= a single line of text")
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
