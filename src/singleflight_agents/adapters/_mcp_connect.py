"""Connecting to an MCP server on demand: the first call that must run opens the session, in a
task of its own; replay never gets here."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.client import Client

if TYPE_CHECKING:
    from .mcp import Core



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
    first."""

    def __init__(self, target: Any, core: Core) -> None:
        self._target, self._core = target, core
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
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
        return self._session is not None

    async def get(self, what: str) -> Any:
        self._core.refuse_in_replay(what, "this call can only run there (a side-effecting or "
                                          "failing call is never recorded)")
        if not self.owned:
            return self._session
        loop = asyncio.get_running_loop()
        async with self._lock.get():
            task = self._task
            if self._session is None or self._loop is not loop or (task is not None
                                                                    and task.done()):
                self._session = None  # one opened on another loop, or closed, is no use here
                self._session = await self._open(loop)
                self._loop = loop
        return self._session

    def _enter(self) -> AbstractAsyncContextManager[Any]:
        target = self._target
        if isinstance(target, StdioServerParameters | str):
            return Client(target)
        if isinstance(target, Client):
            return target
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
            with contextlib.suppress(Exception):  # a server that died has nothing to close
                await task


def _entered(client: Client) -> bool:
    try:
        client.session  # noqa: B018  (raises until the client is entered)
    except RuntimeError:
        return False
    return True
