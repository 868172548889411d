"""Token usage and model of one recorded HTTP exchange with an LLM provider (stdlib only).

Read from the formats the providers document: OpenAI chat completions and Responses,
Anthropic messages, Gemini ``generateContent``; each as one JSON body or streamed (SSE, and
Gemini's JSON array of chunks). The body is the decoded response (gzip and br undone).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

Usage = tuple[str | None, int, int]

# Gemini names the model in the path: /v1beta/models/gemini-2.0-flash:generateContent, and on
# Vertex .../publishers/google/models/gemini-2.0-flash:streamGenerateContent.
_PATH_MODEL = re.compile(r"models/([^/:]+):")

# The token fields of each family, (input, output), first field first: a family counts when
# one of its first fields holds a count, so a body that spells both (a proxy adding aliases)
# is never counted twice. All three report every prompt token the model read:
# - Gemini: promptTokenCount already includes cachedContentTokenCount; tool-use prompts and
#   thoughts are billed as input and output but reported beside them.
# - OpenAI: prompt_tokens / input_tokens include cached tokens, completion_tokens /
#   output_tokens include reasoning tokens.
# - Anthropic: input_tokens excludes the cache, so cache writes and reads are added: the
#   prompt's size, comparable across providers. A price per input token then overstates
#   cache reads (billed at a tenth) and understates writes: our prices know no cache.
_FAMILIES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("promptTokenCount", "toolUsePromptTokenCount"), ("candidatesTokenCount", "thoughtsTokenCount")),
    (("prompt_tokens",), ("completion_tokens",)),
    (("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"), ("output_tokens",)),
)

_SSE_START = (b"data:", b"event:", b"id:", b"retry:", b":")


def usage_of(path: str, request_body: bytes, content_type: str, body: bytes) -> Usage | None:
    """(model, input_tokens, output_tokens) of a provider response, or None when the body
    holds no usage we know."""
    found = _fold(_documents(content_type, body))
    if found is None:
        return None
    # The request's model is what the user chose and what price tables are keyed by; the
    # response names the snapshot that served it (gpt-4o-2024-08-06): only a fallback.
    model = _request_model(request_body) or _path_model(path) or found[0]
    return model, found[1], found[2]


def _documents(content_type: str, body: bytes) -> Iterator[Any]:
    """The JSON documents of the body: the one object, a streamed array's chunks, or each
    SSE event's data."""
    if "event-stream" in str(content_type).lower() or body[:64].lstrip().startswith(_SSE_START):
        yield from _sse_documents(body.decode("utf-8", errors="replace"))
        return
    document = _json(body)
    if isinstance(document, list):  # streamGenerateContent without alt=sse
        yield from document
    else:
        yield document


def _sse_documents(text: str) -> Iterator[Any]:
    """The JSON of each event's data that may carry usage; ``[DONE]`` and others skipped."""
    for data in _sse_events(text):
        # Most events are text deltas: parse only those that can hold usage (linear overall).
        if '"usage' in data:
            yield _json(data)


def _sse_events(text: str) -> Iterator[str]:
    """Each event's ``data:`` lines joined by newlines (the SSE format); ``event:``, ``id:``
    and comments ignored. A last event without its blank line still counts (truncated)."""
    data: list[str] = []
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line:
            if data:
                yield "\n".join(data)
            data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _fold(documents: Iterable[Any]) -> Usage | None:
    """The served model and the tokens, from the usage fields of all the documents, each
    over the last: a stream's last usage wins, Anthropic's deltas update the start's."""
    model: str | None = None
    fields: dict[str, Any] = {}
    for document in documents:
        served, usage = _part(document)
        model = served or model
        if isinstance(usage, dict):
            # A delta's null means "not reported here", not zero.
            fields.update((k, v) for k, v in usage.items() if v is not None)
    counts = _counts(fields)
    return None if counts is None else (model, counts[0], counts[1])


def _part(document: Any) -> tuple[str | None, Any]:
    """(served model, usage object) of one document; either may be None."""
    if not isinstance(document, dict):
        return None, None
    if "usageMetadata" in document:  # Gemini's GenerateContentResponse
        return _model_name(document.get("modelVersion")), document["usageMetadata"]
    kind = document.get("type")
    if kind == "message_start":  # Anthropic: the message so far, its prompt counted
        document = document.get("message")
    elif isinstance(kind, str) and kind.startswith("response."):  # Responses stream events
        document = document.get("response")
    if not isinstance(document, dict):
        return None, None
    # Anthropic's message_delta, a chat chunk, or a whole response object.
    return _model_name(document.get("model")), document.get("usage")


def _counts(fields: dict[str, Any]) -> tuple[int, int] | None:
    for inputs, outputs in _FAMILIES:
        if _count(fields.get(inputs[0])) is not None or _count(fields.get(outputs[0])) is not None:
            return (sum(_count(fields.get(name)) or 0 for name in inputs),
                    sum(_count(fields.get(name)) or 0 for name in outputs))
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _request_model(request_body: bytes) -> str | None:
    request = _json(request_body) if request_body else None
    return _model_name(request.get("model")) if isinstance(request, dict) else None


def _path_model(path: str) -> str | None:
    found = _PATH_MODEL.search(str(path))
    return _model_name(found.group(1)) if found else None


def _model_name(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= 256 and value.isprintable():
        return value
    return None


def _json(data: str | bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # not JSON, truncated, too deep, or an absurd number
        return None
