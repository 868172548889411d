"""Token usage and model read out of recorded provider responses: OpenAI chat completions and
Responses, Anthropic messages, Gemini generateContent; JSON and streamed; and garbage."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from singleflight_agents._http_usage import usage_of

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
GEMINI = "/v1beta/models/gemini-2.0-flash:generateContent"
GEMINI_STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"


def request(**body: Any) -> bytes:
    return json.dumps(body).encode()


def sse(*events: tuple[str | None, Any], newline: str = "\n") -> bytes:
    """Server-sent events as the providers write them: optional ``event:``, one ``data:``."""
    out = []
    for event, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {event}{newline}" if event else ""
        out.append(f"{head}data: {text}{newline}{newline}")
    return "".join(out).encode()


# -- OpenAI chat completions ---------------------------------------------------------------

CHAT = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion",
    "created": 1741570283, "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there!",
                                         "refusal": None, "annotations": []},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
              "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0,
                                            "rejected_prediction_tokens": 0}},
    "service_tier": "default", "system_fingerprint": "fp_fc9f1d7035",
}


def chat_stream(include_usage: bool) -> bytes:
    base = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_44709d6fcb"}
    extra = {"usage": None} if include_usage else {}
    events: list[tuple[str | None, Any]] = [
        (None, {**base, **extra, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                     "content": ""},
                                              "logprobs": None, "finish_reason": None}]})]
    for word in ("Hello", "!", " How", " can", " I", " help", "?"):
        events.append((None, {**base, **extra, "choices": [{"index": 0, "delta": {"content": word},
                                                            "logprobs": None,
                                                            "finish_reason": None}]}))
    events.append((None, {**base, **extra, "choices": [{"index": 0, "delta": {},
                                                        "logprobs": None, "finish_reason": "stop"}]}))
    if include_usage:
        events.append((None, {**base, "choices": [],
                              "usage": {"prompt_tokens": 19, "completion_tokens": 10,
                                        "total_tokens": 29}}))
    events.append((None, "[DONE]"))
    return sse(*events)


def test_chat_completion_json_prefers_the_requested_model() -> None:
    body = json.dumps(CHAT).encode()
    found = usage_of("/v1/chat/completions", request(model="gpt-4o", messages=[]), JSON, body)
    assert found == ("gpt-4o", 1117, 46)  # cached tokens are part of prompt_tokens


def test_chat_completion_falls_back_to_the_served_model() -> None:
    body = json.dumps(CHAT).encode()
    assert usage_of("/v1/chat/completions", b"", JSON, body) == ("gpt-4o-2024-08-06", 1117, 46)
    for req in (b"not json", request(model=7)):
        assert usage_of("/v1/chat/completions", req, JSON, body) == ("gpt-4o-2024-08-06", 1117, 46)


def test_chat_completion_stream_takes_the_usage_chunk() -> None:
    body = chat_stream(include_usage=True)
    req = request(model="gpt-4o-mini", stream=True, stream_options={"include_usage": True})
    assert usage_of("/v1/chat/completions", req, SSE, body) == ("gpt-4o-mini", 19, 10)


def test_chat_completion_stream_without_a_usage_chunk_is_none() -> None:
    body = chat_stream(include_usage=False)
    assert usage_of("/v1/chat/completions", request(model="gpt-4o-mini", stream=True), SSE,
                    body) is None


def test_chat_stream_with_crlf_lines_and_comments() -> None:
    body = b": keep-alive\r\n\r\n" + chat_stream(include_usage=True).replace(b"\n", b"\r\n")
    assert usage_of("/v1/chat/completions", request(model="m"), SSE, body) == ("m", 19, 10)


def test_an_embeddings_answer_counts_its_input() -> None:
    body = json.dumps({"object": "list", "model": "text-embedding-3-small",
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
                       "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()
    found = usage_of("/v1/embeddings", request(model="text-embedding-3-small", input="hi"), JSON,
                     body)
    assert found == ("text-embedding-3-small", 8, 0)


# -- OpenAI Responses ----------------------------------------------------------------------

RESPONSE = {
    "id": "resp_67ccd2bed1ec8190b14f964abc054267", "object": "response",
    "created_at": 1741476542, "status": "completed", "error": None,
    "incomplete_details": None, "model": "gpt-4.1-2025-04-14",
    "output": [{"type": "message", "id": "msg_67ccd2bf17f0", "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "In a peaceful grove...",
                             "annotations": []}]}],
    "parallel_tool_calls": True,
    "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0},
              "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 0},
              "total_tokens": 123},
}


def test_responses_json() -> None:
    found = usage_of("/v1/responses", request(model="gpt-4.1", input="Tell me a story"), JSON,
                     json.dumps(RESPONSE).encode())
    assert found == ("gpt-4.1", 36, 87)


def responses_stream(completed: bool) -> bytes:
    started = {**RESPONSE, "status": "in_progress", "output": [], "usage": None}
    events: list[tuple[str | None, Any]] = [
        ("response.created", {"type": "response.created", "sequence_number": 0,
                              "response": started}),
        ("response.in_progress", {"type": "response.in_progress", "sequence_number": 1,
                                  "response": started}),
        ("response.output_text.delta", {"type": "response.output_text.delta",
                                        "sequence_number": 2, "item_id": "msg_67ccd2bf17f0",
                                        "output_index": 0, "content_index": 0,
                                        "delta": "In a peaceful grove..."}),
    ]
    if completed:
        events.append(("response.completed", {"type": "response.completed",
                                               "sequence_number": 3, "response": RESPONSE}))
    return sse(*events)


def test_responses_stream_takes_the_completed_event() -> None:
    found = usage_of("/v1/responses", request(model="gpt-4.1", stream=True), SSE,
                     responses_stream(completed=True))
    assert found == ("gpt-4.1", 36, 87)


def test_responses_stream_cut_before_completion_is_none() -> None:
    assert usage_of("/v1/responses", request(model="gpt-4.1", stream=True), SSE,
                    responses_stream(completed=False)) is None


# -- Anthropic messages --------------------------------------------------------------------

MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 2095, "cache_creation_input_tokens": 100,
              "cache_read_input_tokens": 2000, "output_tokens": 503,
              "service_tier": "standard"},
}


def test_anthropic_json_counts_cache_reads_and_writes_as_input() -> None:
    found = usage_of("/v1/messages", request(model="claude-sonnet-4-0", max_tokens=1024), JSON,
                     json.dumps(MESSAGE).encode())
    assert found == ("claude-sonnet-4-0", 2095 + 100 + 2000, 503)


def test_anthropic_json_without_cache_fields() -> None:
    message = {**MESSAGE, "usage": {"input_tokens": 12, "output_tokens": 6}}
    assert usage_of("/v1/messages", b"{}", JSON, json.dumps(message).encode()) == (
        "claude-sonnet-4-20250514", 12, 6)


def anthropic_stream(delta_usage: dict[str, Any] | None) -> bytes:
    start = {"type": "message_start", "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant",
        "content": [], "model": "claude-3-5-sonnet-20241022", "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 10, "output_tokens": 1}}}
    events: list[tuple[str | None, Any]] = [
        ("message_start", start),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hello"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "!"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    if delta_usage is not None:
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "tool_use",
                                                   "stop_sequence": None},
                                         "usage": {"output_tokens": 7}}))
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "end_turn",
                                                   "stop_sequence": None},
                                         "usage": delta_usage}))
    events.append(("message_stop", {"type": "message_stop"}))
    return sse(*events)


def test_anthropic_stream_takes_the_last_cumulative_delta() -> None:
    body = anthropic_stream({"output_tokens": 15})
    found = usage_of("/v1/messages", request(model="claude-3-5-sonnet-latest", stream=True), SSE,
                     body)
    assert found == ("claude-3-5-sonnet-latest", 25 + 10, 15)


def test_anthropic_stream_delta_may_restate_the_input() -> None:
    # Newer deltas carry cumulative input and cache counts too (null where not reported);
    # Anthropic-compatible gateways may send the real input only there.
    body = anthropic_stream({"input_tokens": 30, "cache_creation_input_tokens": None,
                             "cache_read_input_tokens": 12, "output_tokens": 15})
    assert usage_of("/v1/messages", b"", SSE, body) == ("claude-3-5-sonnet-20241022", 42, 15)


def test_anthropic_stream_cut_after_the_start_counts_the_prompt() -> None:
    body = anthropic_stream(None)
    assert usage_of("/v1/messages", request(model="claude-3-5-haiku-latest"), SSE, body) == (
        "claude-3-5-haiku-latest", 35, 1)


# -- Gemini --------------------------------------------------------------------------------

def gemini_chunk(text: str, usage: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                 "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": usage,
            "modelVersion": "gemini-2.5-flash-preview-05-20", "responseId": "abc123"}


def test_gemini_json_takes_the_model_from_the_path() -> None:
    body = json.dumps(gemini_chunk("Hi!", {
        "promptTokenCount": 8, "candidatesTokenCount": 12, "totalTokenCount": 20,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 8}]}, "STOP")).encode()
    req = request(contents=[{"role": "user", "parts": [{"text": "Hello"}]}])
    assert usage_of(GEMINI, req, JSON, body) == ("gemini-2.0-flash", 8, 12)


def test_gemini_thoughts_and_tool_prompts_are_counted() -> None:
    body = json.dumps(gemini_chunk("42", {
        "promptTokenCount": 100, "cachedContentTokenCount": 60, "toolUsePromptTokenCount": 5,
        "candidatesTokenCount": 3, "thoughtsTokenCount": 250, "totalTokenCount": 358})).encode()
    assert usage_of(GEMINI, b"{}", JSON, body) == ("gemini-2.0-flash", 105, 253)


def test_gemini_vertex_path_and_omitted_zero_fields() -> None:
    # proto3 JSON leaves zero counts out: an empty answer has no candidatesTokenCount.
    body = json.dumps(gemini_chunk("", {"promptTokenCount": 4, "totalTokenCount": 4})).encode()
    path = ("/v1/projects/p/locations/us-central1/publishers/google/models/"
            "gemini-2.0-flash-001:generateContent")
    assert usage_of(path, b"", JSON, body) == ("gemini-2.0-flash-001", 4, 0)


def test_gemini_model_version_is_the_fallback() -> None:
    body = json.dumps(gemini_chunk("x", {"promptTokenCount": 1, "candidatesTokenCount": 1}))
    assert usage_of("/proxy/generate", b"", JSON, body.encode()) == (
        "gemini-2.5-flash-preview-05-20", 1, 1)


GEMINI_CHUNKS = [
    gemini_chunk("The", {"promptTokenCount": 9, "totalTokenCount": 9}),
    gemini_chunk(" sky is", {"promptTokenCount": 9, "candidatesTokenCount": 4,
                             "totalTokenCount": 13}),
    gemini_chunk(" blue.", {"promptTokenCount": 9, "candidatesTokenCount": 7,
                            "thoughtsTokenCount": 30, "totalTokenCount": 46}, "STOP"),
]


def test_gemini_sse_stream_takes_the_last_chunk() -> None:
    body = sse(*((None, chunk) for chunk in GEMINI_CHUNKS), newline="\r\n")
    assert usage_of(GEMINI_STREAM + "?alt=sse", b"{}", SSE, body) == ("gemini-2.5-flash", 9, 37)


def test_gemini_json_array_stream() -> None:
    body = ("[" + ",\r\n".join(json.dumps(chunk, indent=2) for chunk in GEMINI_CHUNKS)
            + "]").encode()
    assert usage_of(GEMINI_STREAM, b"", JSON, body) == ("gemini-2.5-flash", 9, 37)


# -- SSE details ---------------------------------------------------------------------------

def test_multi_line_data_is_joined_and_the_content_type_may_lie() -> None:
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
                       indent=1)
    body = ("id: 1\nretry: 100\n" + "".join(f"data: {line}\n" for line in usage.splitlines())
            + "\ndata: [DONE]\n\n").encode()
    for content_type in (SSE, "application/json", ""):
        assert usage_of("/v1/chat/completions", request(model="m"), content_type, body) == (
            "m", 3, 2)


def test_a_last_event_without_its_blank_line_counts() -> None:
    body = sse((None, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}))
    assert usage_of("/x", request(model="m"), SSE, body.rstrip(b"\n")) == ("m", 3, 2)


def test_data_without_a_space_after_the_colon() -> None:
    body = b'data:{"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
    assert usage_of("/x", b"", SSE, body) == (None, 5, 1)


# -- garbage -------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b"{}", b"42", b'"usage"', b"<html>502 Bad Gateway</html>",
    b"\xff\xfe\x00garbage", b'{"usage": null}', b'{"usage": []}', b'{"usage": {}}',
    b'{"usage": {"prompt_tokens": "11", "completion_tokens": null}}',
    b'{"usage": {"prompt_tokens": -1}}', b'{"usage": {"input_tokens": true}}',
    b'{"usage": {"total_tokens": 5}}', b'{"usageMetadata": {"totalTokenCount": 5}}',
    b'{"usageMetadata": "x"}', b'{"type": "message_start", "message": "x"}',
    b'{"type": "response.completed", "response": null}', b'{"type": "response.completed"}',
    b'{"object": "chat.completion", "usage": {"prompt_tokens": 1' + b"1" * 10_000 + b"}}",
    b"[" * 100_000 + b"]" * 100_000, b'{"usage": {"prompt_tokens": 1e400}}',
])
def test_garbage_is_none(body: bytes) -> None:
    for content_type in (JSON, SSE):
        assert usage_of("/v1/chat/completions", request(model="m"), content_type, body) is None
    assert usage_of("/v1/chat/completions", b"", SSE, b"data: " + body + b"\n\n") is None


def test_truncated_json_is_none() -> None:
    body = json.dumps(CHAT).encode()
    for cut in (1, len(body) // 2, len(body) - 1):
        assert usage_of("/v1/chat/completions", request(model="m"), JSON, body[:cut]) is None


def test_a_truncated_usage_event_falls_back_to_earlier_usage() -> None:
    body = anthropic_stream({"output_tokens": 15})
    cut = body.index(b'"output_tokens": 15')
    assert usage_of("/v1/messages", b"", SSE, body[:cut]) == ("claude-3-5-sonnet-20241022", 35, 7)


def test_bad_request_models_are_ignored() -> None:
    body = json.dumps(CHAT).encode()
    for model in ("", "a\nb", "x" * 300, None, ["gpt-4o"]):
        assert usage_of("/v1/chat/completions", request(model=model), JSON, body) == (
            "gpt-4o-2024-08-06", 1117, 46)


def test_large_streams_take_linear_time() -> None:
    delta = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "usage " * 5}}
    events: list[tuple[str | None, Any]] = [("content_block_delta", delta)] * 100_000
    body = anthropic_stream({"output_tokens": 100_001}) + sse(*events)
    started = time.perf_counter()
    assert usage_of("/v1/messages", b"", SSE, body) == ("claude-3-5-sonnet-20241022", 35, 100_001)
    assert time.perf_counter() - started < 5
