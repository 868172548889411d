"""HTTP receipts: the requests of any client built on httpx (or httpx2) recorded, shared in
flight and replayed, for the hosts the user lists.

Two ways in. ``ReceiptTransport`` / ``AsyncReceiptTransport`` wrap a transport a user
passes to ``httpx.Client(transport=...)``. A session with ``http=[hosts]`` (the plugin's
``--singleflight-http``) routes every client's default transport through receipts for those
hosts, without a code change. Requests to other hosts are untouched.

A request to a listed host is one call of the engine: ``GET`` and ``HEAD`` are reads,
``POST`` is deterministic by the user's choice (as a model turn is), other methods are not
shared (they run in record and are refused in replay). The receipt holds the status, the
headers (no cookies or request ids) and the body as the chunks it arrived in, so a stream
replays as the same stream. The first caller reads the whole answer before it returns: its
waiters, and every later caller, get the full recording. Only 2xx answers and redirects are
stored; any other answer reaches its caller (and that flight's waiters) but is never stored,
so an SDK's retries still see a 429.
This module imports no HTTP library: responses are built with the request's own module.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

from . import _http_keys
from ._http_keys import Described, Hosts, check_key_headers, kept_headers
from .models import ReplayMissError, SingleflightError, ToolExecutionOptions
from .sessions import active_session, report_miss

__all__ = ["AsyncReceiptTransport", "NotRecorded", "ReceiptTransport"]

Send = Callable[[Any], Any]
_FIXED = ("tool_name", "key", "redact", "meter", "deterministic", "bounded_read")
# Redirects are answers like any other (a client following them makes the next request
# itself); a 304 answers a conditional request, whose headers are not keyed: never kept.
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Set while a request goes through receipts: the default transport it reaches is not routed
# through receipts a second time.
_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("singleflight_http", default=False)


class _NotStored(Exception):
    """An answer that is not kept (an error, a 304): returned to the caller, never stored."""

    def __init__(self, value: dict[str, Any]) -> None:
        super().__init__(f"HTTP {value['status']}")
        self.value = value


class _Exchange:
    """One request through receipts: the request, how to send it, and what keys it."""

    __slots__ = ("body", "described", "live_headers", "request", "send")

    def __init__(self, request: Any, send: Send, described: Described, body: bytes) -> None:
        self.request, self.send, self.described, self.body = request, send, described, body
        # The response's headers as they came (cookies, request ids), when this very call sent
        # the request: they reach its caller, never a receipt.
        self.live_headers: list[list[str]] | None = None


class _Receipts:
    """What both transports and the session-wide routing share: a request's options, the
    engine call, and the response rebuilt from what was recorded."""

    def __init__(self, sf: Any, key_headers: Iterable[str], options: dict[str, Any]) -> None:
        for fixed in _FIXED:
            if fixed in options:
                raise TypeError(f"HTTP receipts set {fixed} themselves (from the method, host "
                                f"and body); it cannot be given")
        if "share_failures" in options:
            raise TypeError("HTTP receipts take no share_failures: an error answer (a 429, a "
                            "500) is returned to the calls sharing its flight as a response, "
                            "and never stored")
        # Receipts and miss messages show the method, URL and model: never the body.
        self.base = ToolExecutionOptions().replace(**options, redact=_http_keys.shown)
        self.key_headers = _http_keys.KEY_HEADERS + check_key_headers(key_headers)
        self.sf = sf

    def _call(self, request: Any, body: bytes, send: Send) -> tuple[Any, _Exchange,
                                                                     ToolExecutionOptions]:
        described = Described(request, body, self.key_headers)
        options = self.base
        if described.flag is not None:
            options = options.replace(**{described.flag: True})
        sf = self.sf if self.sf is not None else _session_engine()
        if described.model is not None:
            options = options.replace(meter=_meter(sf, described.model, described.provider))
        return sf, _Exchange(request, send, described, body), options

    def handle_sync(self, request: Any, send: Send) -> Any:
        sf, exchange, options = self._call(request, request.read(), send)
        _refuse_unrecorded_in_replay(sf, exchange.described)
        token = _INSIDE.set(True)
        try:
            value = sf.do_sync(exchange.described.tool_name, exchange.described.key,
                               functools.partial(_send_sync, exchange), options=options).value
        except _NotStored as answer:
            value = answer.value
        finally:
            _INSIDE.reset(token)
        return _response(request, value, exchange.live_headers)

    async def handle_async(self, request: Any, send: Callable[[Any], Awaitable[Any]]) -> Any:
        sf, exchange, options = self._call(request, await request.aread(), send)
        _refuse_unrecorded_in_replay(sf, exchange.described)
        token = _INSIDE.set(True)
        try:
            value = (await sf.do(exchange.described.tool_name, exchange.described.key,
                                 functools.partial(_send_async, exchange), options=options)).value
        except _NotStored as answer:
            value = answer.value
        finally:
            _INSIDE.reset(token)
        return _response(request, value, exchange.live_headers)


class NotRecorded(ReplayMissError):
    """Replay reached a request of a method receipts never record (``PUT``, ``DELETE``,
    ``PATCH``, ...): replay never sends it. A :class:`ReplayMissError`, so the pytest plugin
    fails the test."""

    def __init__(self, described: Described) -> None:
        key = described.key
        SingleflightError.__init__(
            self, f"{described.tool_name}: {key['method']} {key['url']} is never recorded "
                  f"(HTTP receipts record GET, HEAD and POST), so replay neither answers nor "
                  f"sends it; run this test in record mode, or stub that request in the test")
        self.tool_name = described.tool_name
        self.inputs = f"{key['method']} {key['url']}"


def _refuse_unrecorded_in_replay(sf: Any, described: Described) -> None:
    if described.flag is not None:
        return
    engine = sf if sf is not None else _session_engine()
    if getattr(engine, "engine", engine).current_mode() == "replay":
        raise report_miss(NotRecorded(described))


def _session_engine() -> Any:
    session = active_session()
    if session is None:
        raise RuntimeError("an HTTP receipt transport without sf= needs an active session: "
                           "pass sf=Singleflight(...), or start singleflight_agents.session()")
    return session.engine


def _send_sync(exchange: _Exchange) -> dict[str, Any]:
    response = exchange.send(exchange.request)
    try:
        chunks = [bytes(chunk) for chunk in response.stream]
    finally:
        response.close()
    return _recorded(exchange, response, chunks)


async def _send_async(exchange: _Exchange) -> dict[str, Any]:
    response = await exchange.send(exchange.request)
    try:
        chunks = [bytes(chunk) async for chunk in response.stream]
    finally:
        await response.aclose()
    return _recorded(exchange, response, chunks)


def _recorded(exchange: _Exchange, response: Any, chunks: list[bytes]) -> dict[str, Any]:
    exchange.live_headers = [[name.decode("latin-1"), text.decode("latin-1")]
                             for name, text in response.headers.raw]
    value: dict[str, Any] = {"status": response.status_code,
                             "headers": kept_headers(response.headers.raw), "chunks": chunks}
    if not (200 <= response.status_code < 300 or response.status_code in _REDIRECTS):
        raise _NotStored(value)
    if exchange.described.model is not None:
        value["usage"] = _usage(exchange, value)
    return value


def _usage(exchange: _Exchange, value: dict[str, Any]) -> dict[str, int]:
    from ._http_usage import usage_of

    module = _module_of(exchange.request)
    try:  # decoded as the client would (gzip, br); the chunks themselves stay as they came
        decoded = module.Response(value["status"], headers=value["headers"],
                                  content=b"".join(value["chunks"])).content
    except Exception:  # e.g. br without brotli installed: the client will say so, not us
        decoded = b""
    headers = {name.lower(): text for name, text in value["headers"]}
    found = usage_of(exchange.request.url.path, exchange.body,
                     headers.get("content-type", ""), decoded)
    tokens_in, tokens_out = (0, 0) if found is None else (found[1], found[2])
    return {"input_tokens": tokens_in, "output_tokens": tokens_out}


def _meter(sf: Any, model: str,
           provider: str | None) -> Callable[[Any], tuple[int, int, float | None]]:
    engine = getattr(sf, "engine", sf)  # the plugin's fixture, or an engine

    def meter(value: Any) -> tuple[int, int, float | None]:
        usage = value.get("usage") or {"input_tokens": 0, "output_tokens": 0}
        tokens_in, tokens_out = int(usage["input_tokens"]), int(usage["output_tokens"])
        if not tokens_in and not tokens_out:
            return 0, 0, 0.0  # an answer without usage (an embedding list, a model list)
        prices = engine.current_prices()
        return tokens_in, tokens_out, prices.dollars(model, tokens_in, tokens_out,
                                                     provider=provider)

    return meter


def _module_of(request: Any) -> Any:
    return sys.modules[type(request).__module__.partition(".")[0]]


def _response(request: Any, value: dict[str, Any], live_headers: list[list[str]] | None) -> Any:
    module = _module_of(request)
    stream = _stream_type(module)(value["chunks"])
    headers = value["headers"] if live_headers is None else live_headers
    return module.Response(value["status"], headers=[tuple(h) for h in headers],
                           stream=stream, request=request)


@functools.cache
def _stream_type(module: Any) -> Any:
    class Recorded(module.SyncByteStream, module.AsyncByteStream):  # type: ignore[misc]
        """The recorded chunks, as they arrived, without a pause between them."""

        def __init__(self, chunks: list[bytes]) -> None:
            self._chunks = chunks

        def __iter__(self) -> Iterator[bytes]:
            yield from self._chunks

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in self._chunks:
                yield chunk

    return Recorded


class ReceiptTransport:
    """A sync httpx transport that sends requests for ``hosts`` through receipts.

    ``inner`` is the transport that really sends (default: the request's module's
    ``HTTPTransport()``). ``sf`` is a :class:`~singleflight_agents.Singleflight` or the
    pytest ``singleflight`` fixture (default: the active session's engine). ``hosts``
    limits it to those hosts (default: every request through it). ``key_headers`` adds
    request headers that change the answer to the key. Other keywords are
    :class:`~singleflight_agents.ToolExecutionOptions` fields (``ttl=``, ...).
    """

    def __init__(self, inner: Any = None, *, sf: Any = None, hosts: Iterable[str] | str | None = None,
                 key_headers: Iterable[str] = (), **options: Any) -> None:
        self.inner = inner
        self.hosts = None if hosts is None else Hosts(hosts)
        self._receipts = _Receipts(sf, key_headers, options)

    def _inner(self, request: Any) -> Any:
        if self.inner is None:
            self.inner = _module_of(request).HTTPTransport()
        return self.inner

    def handle_request(self, request: Any) -> Any:
        inner = self._inner(request)
        if self.hosts is not None and request.url.host not in self.hosts:
            return inner.handle_request(request)
        return self._receipts.handle_sync(request, inner.handle_request)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()

    def __enter__(self) -> ReceiptTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncReceiptTransport:
    """The async twin of :class:`ReceiptTransport`, for ``httpx.AsyncClient``."""

    def __init__(self, inner: Any = None, *, sf: Any = None, hosts: Iterable[str] | str | None = None,
                 key_headers: Iterable[str] = (), **options: Any) -> None:
        self.inner = inner
        self.hosts = None if hosts is None else Hosts(hosts)
        self._receipts = _Receipts(sf, key_headers, options)

    def _inner(self, request: Any) -> Any:
        if self.inner is None:
            self.inner = _module_of(request).AsyncHTTPTransport()
        return self.inner

    async def handle_async_request(self, request: Any) -> Any:
        inner = self._inner(request)
        if self.hosts is not None and request.url.host not in self.hosts:
            return await inner.handle_async_request(request)
        return await self._receipts.handle_async(request, inner.handle_async_request)

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()

    async def __aenter__(self) -> AsyncReceiptTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- session-wide routing -------------------------------------------------------------------

_MODULES = ("httpx", "httpx2")
_ORIGINAL: dict[tuple[type, str], Callable[..., Any]] = {}


def _routed(session_hosts: Callable[[], tuple[Any, Hosts] | None], request: Any) -> Any:
    """The session's receipts if ``request`` goes to one of its hosts, else ``None``."""
    if _INSIDE.get():
        return None
    found = session_hosts()
    if found is None or request.url.host not in found[1]:
        return None
    return _session_receipts(found[0])


def _hosts_now() -> tuple[Any, Hosts] | None:
    session = active_session()
    if session is None:
        return None
    hosts = session.http_now()
    return (session, hosts) if hosts else None


@functools.lru_cache(maxsize=8)
def _session_receipts(session: Any) -> _Receipts:
    return _Receipts(None, (), {} if session.ttl is None else {"ttl_seconds": session.ttl})


def _patched_sync(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def handle_request(self: Any, request: Any) -> Any:
        receipts = _routed(_hosts_now, request)
        if receipts is None:
            return original(self, request)
        return receipts.handle_sync(request, functools.partial(original, self))

    return handle_request


def _patched_async(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def handle_async_request(self: Any, request: Any) -> Any:
        receipts = _routed(_hosts_now, request)
        if receipts is None:
            return await original(self, request)
        return await receipts.handle_async(request, functools.partial(original, self))

    return handle_async_request


def install() -> None:
    """Route the default transports of httpx and httpx2 (those installed) through the
    active session's receipts for its hosts. Idempotent; :func:`uninstall` undoes it."""
    for name in _MODULES:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            for cls, method, patch in ((module.HTTPTransport, "handle_request", _patched_sync),
                                       (module.AsyncHTTPTransport, "handle_async_request",
                                        _patched_async)):
                if (cls, method) not in _ORIGINAL:
                    _ORIGINAL[cls, method] = getattr(cls, method)
                    setattr(cls, method, patch(_ORIGINAL[cls, method]))


def uninstall() -> None:
    """Give httpx and httpx2 their own default transports back."""
    while _ORIGINAL:
        (cls, method), original = _ORIGINAL.popitem()
        setattr(cls, method, original)
    _session_receipts.cache_clear()
