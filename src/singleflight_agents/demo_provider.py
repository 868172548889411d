"""A stand-in model provider for demos, examples, tests and benchmarks, offline.

OpenAI chat completions and responses, Anthropic messages and Gemini ``generateContent``
(and ``streamGenerateContent``), JSON and streamed (SSE), in
the formats the providers document. The answer depends only on the request, so identical
requests get identical answers. Served through an httpx (or httpx2) ``MockTransport``, or
over a real HTTP server on 127.0.0.1 (``Server``), optionally with a delay per answer.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, dict[str, str], list[bytes]]


def _last_text(body: dict[str, Any]) -> str:
    items = body.get("messages") or body.get("input") or []
    if isinstance(items, str):
        return items
    content = items[-1].get("content", "") if items else ""
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content)
    return str(content)


def _sse(events: list[tuple[str | None, Any]]) -> list[bytes]:
    chunks = []
    for event, data in events:
        head = f"event: {event}\n" if event else ""
        text = data if isinstance(data, str) else json.dumps(data)
        chunks.append(f"{head}data: {text}\n\n".encode())
    return chunks


def chat(body: dict[str, Any]) -> Answer:
    text = f"echo: {_last_text(body)}"
    model = body["model"]
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    if not body.get("stream"):
        answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": text}}],
                  "usage": usage}
        return 200, {"content-type": "application/json"}, [json.dumps(answer).encode()]
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    events: list[tuple[str | None, Any]] = [
        (None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]})]
    for word in text.split(" "):
        events.append((None, {**base, "choices": [{"index": 0, "delta": {"content": word + " "},
                                                    "finish_reason": None}]}))
    events.append((None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**base, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return 200, {"content-type": "text/event-stream"}, _sse(events)


def responses(body: dict[str, Any]) -> Answer:
    text = f"echo: {_last_text(body)}"
    message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    usage = {"input_tokens": 13, "output_tokens": 5, "total_tokens": 18,
             "input_tokens_details": {"cached_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 0}}
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
                "model": body["model"], "output": [message], "usage": usage,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
    if not body.get("stream"):
        return 200, {"content-type": "application/json"}, [json.dumps(response).encode()]
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    part = {"type": "output_text", "text": "", "annotations": []}
    events: list[tuple[str | None, Any]] = [
        ("response.created", {"type": "response.created", "sequence_number": 0,
                              "response": started}),
        ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 1,
                                        "output_index": 0,
                                        "item": {**message, "status": "in_progress",
                                                 "content": []}}),
        ("response.content_part.added", {"type": "response.content_part.added",
                                         "sequence_number": 2, "item_id": "msg_1",
                                         "output_index": 0, "content_index": 0, "part": part})]
    for n, word in enumerate(text.split(" ")):
        delta = word if n == 0 else " " + word
        events.append(("response.output_text.delta", {
            "type": "response.output_text.delta", "sequence_number": 3 + n, "item_id": "msg_1",
            "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}))
    seq = 3 + len(text.split(" "))
    events += [
        ("response.output_text.done", {"type": "response.output_text.done", "sequence_number": seq,
                                       "item_id": "msg_1", "output_index": 0, "content_index": 0,
                                       "text": text, "logprobs": []}),
        ("response.output_item.done", {"type": "response.output_item.done",
                                       "sequence_number": seq + 1, "output_index": 0,
                                       "item": message}),
        ("response.completed", {"type": "response.completed", "sequence_number": seq + 2,
                                "response": response})]
    return 200, {"content-type": "text/event-stream"}, _sse(events)


def messages(body: dict[str, Any]) -> Answer:
    text = f"echo: {_last_text(body)}"
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
               "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
               "stop_sequence": None, "usage": {"input_tokens": 17, "output_tokens": 9}}
    if not body.get("stream"):
        return 200, {"content-type": "application/json"}, [json.dumps(message).encode()]
    start = {**message, "content": [], "stop_reason": None,
             "usage": {"input_tokens": 17, "output_tokens": 1}}
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"})]
    for n, word in enumerate(text.split(" ")):
        events.append(("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": word if n == 0 else " " + word}}))
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 9}}),
        ("message_stop", {"type": "message_stop"})]
    return 200, {"content-type": "text/event-stream"}, _sse(events)


def gemini(body: dict[str, Any], model: str, stream: bool) -> Answer:
    contents = body.get("contents") or [{}]
    text = "echo: " + " ".join(p.get("text", "") for p in contents[-1].get("parts", []))
    usage = {"promptTokenCount": 8, "candidatesTokenCount": 4, "totalTokenCount": 12}

    def response(part: str, last: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": part}]},
                                     "index": 0}
        answer: dict[str, Any] = {"candidates": [candidate], "modelVersion": model}
        if last:
            candidate["finishReason"] = "STOP"
            answer["usageMetadata"] = usage
        return answer

    if not stream:
        return 200, {"content-type": "application/json"}, [json.dumps(response(text, True)).encode()]
    words = text.split(" ")
    events: list[tuple[str | None, Any]] = [
        (None, response(word if n == 0 else " " + word, n == len(words) - 1))
        for n, word in enumerate(words)]
    return 200, {"content-type": "text/event-stream"}, _sse(events)


_GEMINI = re.compile(r"/v1(?:beta)?/models/([^/:]+):(generateContent|streamGenerateContent)$")


def models(body: dict[str, Any]) -> Answer:
    listing = {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 1,
                                           "owned_by": "openai"}]}
    return 200, {"content-type": "application/json"}, [json.dumps(listing).encode()]


ROUTES = {"/v1/models": models, "/v1/chat/completions": chat, "/v1/responses": responses,
          "/v1/messages": messages}


class Provider:
    """Answers requests and remembers each one it saw (path, headers, body)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay  # seconds each answer takes, like a real model's latency
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.fail_next: list[int] = []  # statuses to answer with first (e.g. [429])
        self._lock = threading.Lock()
        self.gate: threading.Event | None = None  # when set up, every answer waits for it

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> Answer:
        with self._lock:
            self.seen.append((path, headers, body))
            status = self.fail_next.pop(0) if self.fail_next else None
        if self.gate is not None and not self.gate.wait(30):
            raise TimeoutError("the provider's gate was never opened")
        if self.delay:
            time.sleep(self.delay)
        if status is not None:
            error = {"error": {"message": "slow down", "type": "rate_limit_error"}}
            return status, {"content-type": "application/json"}, [json.dumps(error).encode()]
        found = _GEMINI.match(path)
        if found:
            return gemini(json.loads(body), found.group(1), found.group(2).startswith("stream"))
        route = ROUTES.get(path)
        if route is None:
            return 404, {"content-type": "application/json"}, [b'{"error": "no route"}']
        return route(json.loads(body) if body else {})

    def mock(self, module: Any, *, asynchronous: bool = False) -> Any:
        """A ``MockTransport`` of ``module`` (httpx or httpx2) answering like the provider,
        a stream chunk by chunk."""
        def handle(request: Any) -> Any:
            status, headers, chunks = self.answer(request.url.path, dict(request.headers),
                                                  request.read())
            content = chunks[0] if len(chunks) == 1 else \
                _async_chunks(chunks) if asynchronous else iter(chunks)
            return module.Response(status, headers={**headers, "x-request-id": "req_123",
                                                    "set-cookie": "session=abc"},
                                   content=content)

        return module.MockTransport(handle)


async def _async_chunks(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class Server:
    """The provider over HTTP on 127.0.0.1 (chunked transfer for streams)."""

    def __init__(self, provider: Provider | None = None) -> None:
        self.provider = provider or Provider()
        provider_ = self.provider

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, headers, chunks = provider_.answer(self.path.split("?")[0],
                                                           dict(self.headers), body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("x-request-id", "req_456")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
