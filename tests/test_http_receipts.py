"""HTTP receipts through the real OpenAI and Anthropic SDKs: shared, recorded, replayed
byte-exact (streams included), keyed without credentials."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

import singleflight_agents as sa
from singleflight_agents import ReceiptTransport, ReplayMissError, Singleflight
from singleflight_agents.demo_provider import Provider, Server, chat
from singleflight_agents.flights import FLIGHTS
from singleflight_agents.http_receipts import AsyncReceiptTransport

MESSAGES = [{"role": "user", "content": "what is 2+2?"}]


def _openai(sf: Any, provider: Provider, key: str = "sk-test-one", **kwargs: Any) -> openai.OpenAI:
    transport = ReceiptTransport(provider.mock(httpx2), sf=sf)
    return openai.OpenAI(api_key=key, http_client=httpx2.Client(transport=transport), **kwargs)


def _async_openai(sf: Any, provider: Provider, key: str = "sk-test-one") -> openai.AsyncOpenAI:
    transport = AsyncReceiptTransport(provider.mock(httpx2, asynchronous=True), sf=sf)
    return openai.AsyncOpenAI(api_key=key, http_client=httpx2.AsyncClient(transport=transport))


def _anthropic(sf: Any, provider: Provider, key: str = "sk-ant-one") -> anthropic.Anthropic:
    transport = ReceiptTransport(provider.mock(httpx2), sf=sf)
    return anthropic.Anthropic(api_key=key, http_client=httpx2.Client(transport=transport))


def _stored_text(sf: Singleflight) -> str:
    return "\n".join(f"{r.inputs} {r.output}" for r in sf.store.iter_receipts())


def test_the_same_chat_call_with_two_api_keys_shares_one_receipt(sf: Singleflight) -> None:
    provider = Provider()
    first = _openai(sf, provider, "sk-test-one").chat.completions.create(
        model="gpt-4o", messages=MESSAGES)
    second = _openai(sf, provider, "sk-test-two").chat.completions.create(
        model="gpt-4o", messages=MESSAGES)
    assert len(provider.seen) == 1
    assert first.model_dump() == second.model_dump()
    assert second.choices[0].message.content == "echo: what is 2+2?"
    stored = _stored_text(sf)
    assert "sk-test-one" not in stored and "sk-test-two" not in stored
    assert "req_123" not in stored and "session=abc" not in stored  # per-request, cookies
    row = sf.summary()["tools"]["model:gpt-4o"]
    assert (row["executed"], row["cache_hits"]) == (1, 1)
    assert (row["tokens_in"], row["tokens_out"], row["tokens_in_saved"]) == (11, 7, 11)


def test_a_chat_stream_replays_byte_exact_through_the_sdk(sf: Singleflight) -> None:
    provider = Provider()
    runs = []
    for _ in range(2):
        stream = _openai(sf, provider).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
        runs.append([chunk.model_dump() for chunk in stream])
    assert len(provider.seen) == 1
    assert runs[0] == runs[1]
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in runs[1] if c["choices"]) \
        == "echo: what is 2+2? "
    assert runs[1][-1]["usage"]["completion_tokens"] == 7
    # The chunks themselves, as they came: a raw stream replays the same bytes in the same cuts.
    client = httpx2.Client(transport=ReceiptTransport(provider.mock(httpx2), sf=sf))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "https://api.openai.com/v1/chat/completions", json=body) as raw:
        cuts = list(raw.iter_raw())
    assert len(provider.seen) == 1
    assert cuts == chat(body)[2]


async def test_async_streams_of_chat_and_responses_replay(sf: Singleflight) -> None:
    provider = Provider()
    texts = []
    for _ in range(2):
        client = _async_openai(sf, provider)
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                      stream=True)
        texts.append("".join([c.choices[0].delta.content or "" async for c in stream]))
        async with client.responses.stream(model="gpt-4.1", input="hello there") as events:
            texts.append((await events.get_final_response()).output_text)
    assert len(provider.seen) == 2
    assert texts == ["echo: what is 2+2? ", "echo: hello there"] * 2


def test_the_responses_stream_helper_replays(sf: Singleflight) -> None:
    provider = Provider()
    finals = []
    for _ in range(2):
        with _openai(sf, provider).responses.stream(model="gpt-4.1", input="hi") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            finals.append((deltas, stream.get_final_response().usage.output_tokens))
    assert len(provider.seen) == 1
    assert finals[0] == finals[1] == (["echo:", " hi"], 5)


def test_anthropic_messages_and_their_stream_replay(sf: Singleflight) -> None:
    provider = Provider()
    for key in ("sk-ant-one", "sk-ant-two"):
        client = _anthropic(sf, provider, key)
        message = client.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                                          messages=MESSAGES)
        assert message.content[0].text == "echo: what is 2+2?"
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                    messages=MESSAGES) as stream:
            assert stream.get_final_text() == "echo: what is 2+2?"
            assert stream.get_final_message().usage.output_tokens == 9
    assert len(provider.seen) == 2  # one plain, one streamed
    assert "sk-ant-" not in _stored_text(sf)
    row = sf.summary()["tools"]["model:claude-sonnet-4-5"]
    assert (row["tokens_in"], row["tokens_out"]) == (34, 18)


async def test_anthropic_async_stream_replays(sf: Singleflight) -> None:
    provider = Provider()
    for _ in range(2):
        client = anthropic.AsyncAnthropic(api_key="sk-ant", http_client=httpx2.AsyncClient(
            transport=AsyncReceiptTransport(provider.mock(httpx2, asynchronous=True), sf=sf)))
        async with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                          messages=MESSAGES) as stream:
            assert await stream.get_final_text() == "echo: what is 2+2?"
    assert len(provider.seen) == 1


def test_per_attempt_headers_key_order_and_credentials_in_the_query_are_not_keyed(
        sf: Singleflight) -> None:
    provider = Provider()
    client = httpx.Client(transport=ReceiptTransport(provider.mock(httpx), sf=sf))
    url = "https://generativelanguage.googleapis.com/v1/chat/completions"
    body = '{"model": "gpt-4o", "temperature": 1.0, "messages": [{"role": "user", "content": "x"}]}'
    client.post(url + "?key=AIza-one", content=body, headers={
        "x-stainless-retry-count": "0", "idempotency-key": "a", "user-agent": "one",
        "content-type": "application/json"})
    client.post(url + "?key=AIza-two", headers={"x-stainless-retry-count": "1",
                                                "idempotency-key": "b", "user-agent": "two"},
                json={"messages": [{"content": "x", "role": "user"}], "temperature": 1,
                      "model": "gpt-4o"})
    assert len(provider.seen) == 1
    # A header that changes the answer is keyed: another version is another call.
    client.post(url, json={"model": "gpt-4o", "messages": []}, headers={"anthropic-version": "1"})
    client.post(url, json={"model": "gpt-4o", "messages": []}, headers={"anthropic-version": "2"})
    assert len(provider.seen) == 3
    assert "AIza" not in _stored_text(sf)


def test_a_429_reaches_the_sdk_retries_and_is_never_stored(sf: Singleflight) -> None:
    provider = Provider()
    provider.fail_next = [429]
    client = _openai(sf, provider, max_retries=1)
    with pytest.raises(openai.RateLimitError):
        _openai(sf, provider, max_retries=0).chat.completions.create(model="gpt-4o",
                                                                       messages=MESSAGES)
    provider.fail_next = [429]
    answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert answer.choices[0].message.content == "echo: what is 2+2?"
    assert len(provider.seen) == 3  # 429, 429 then 200: each attempt reached the server
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(provider.seen) == 3
    assert all("slow down" not in r.output for r in sf.store.iter_receipts())


def test_identical_requests_from_many_threads_make_one_http_call(
        sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = Provider()
    provider.gate = threading.Event()
    joined, count, lock = threading.Event(), [0], threading.Lock()
    original = FLIGHTS.join

    def counting(key: Any) -> Any:
        result = original(key)
        with lock:
            count[0] += 1
            if count[0] >= 8:
                joined.set()
        return result

    monkeypatch.setattr(FLIGHTS, "join", counting)
    texts: list[str] = []

    def call() -> None:
        reply = _openai(sf, provider).chat.completions.create(model="gpt-4o", messages=MESSAGES)
        texts.append(reply.choices[0].message.content or "")

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert joined.wait(30)
    provider.gate.set()
    for thread in threads:
        thread.join(30)
    assert len(provider.seen) == 1
    assert texts == ["echo: what is 2+2?"] * 8


async def test_identical_requests_from_many_tasks_make_one_http_call(sf: Singleflight) -> None:
    provider = Provider()
    client = _async_openai(sf, provider)
    replies = await asyncio.gather(*[client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES) for _ in range(10)])
    assert len(provider.seen) == 1
    assert {r.choices[0].message.content for r in replies} == {"echo: what is 2+2?"}


def test_replay_makes_no_request_and_a_miss_names_the_call_not_its_body(tmp_path: Any) -> None:
    provider = Provider()
    db = str(tmp_path / "r.db")
    with sa.session(db):
        _openai(None, provider).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with sa.session(db, mode="replay"):
        reply = _openai(None, provider, "no-key").chat.completions.create(
            model="gpt-4o", messages=MESSAGES)
        assert reply.choices[0].message.content == "echo: what is 2+2?"
        with pytest.raises(ReplayMissError) as missed:
            _openai(None, provider, max_retries=0).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "my secret prompt"}])
    assert len(provider.seen) == 1
    message = str(missed.value)
    assert "POST" in message and "https://api.openai.com/v1/chat/completions" in message
    assert "gpt-4o" in message and "secret prompt" not in message
    assert "sk-test" not in message


@pytest.mark.slow
def test_a_session_routes_default_clients_of_listed_hosts_only(tmp_path: Any) -> None:
    db = str(tmp_path / "r.db")
    with Server() as server, sa.session(db, http=["127.0.0.1"]):
        port = server.url.rsplit(":", 1)[1]
        for base in (server.url, f"http://localhost:{port}"):
            for _ in range(3):
                client = openai.OpenAI(api_key="sk-live", base_url=base + "/v1")
                assert client.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES).choices[0].message.content
        for _ in range(2):  # plain httpx too
            httpx.post(server.url + "/v1/messages", json={"model": "claude", "messages": []})
        assert len(server.provider.seen) == 1 + 3 + 1  # localhost is not listed
    # Stopped: the default transports are their own again.
    with Server() as server:
        httpx.post(server.url + "/v1/messages", json={"model": "claude", "messages": []})
        assert len(server.provider.seen) == 1
    assert httpx.HTTPTransport.handle_request.__module__.startswith("httpx")


async def test_a_session_routes_async_default_clients(tmp_path: Any) -> None:
    with Server() as server, sa.session(str(tmp_path / "r.db"), http="127.0.0.1"):
        async with anthropic.AsyncAnthropic(api_key="k", base_url=server.url) as client:
            texts = await asyncio.gather(*[client.messages.create(
                model="claude-sonnet-4-5", max_tokens=8, messages=MESSAGES) for _ in range(4)])
        assert {t.content[0].text for t in texts} == {"echo: what is 2+2?"}
        assert len(server.provider.seen) == 1


@pytest.mark.parametrize(("hosts", "fragment"), [
    (["https://api.openai.com"], "no scheme, port or path"),
    (["api.openai.com:443"], "no scheme, port or path"),
    (["api.openai.com/v1"], "no scheme, port or path"),
    ([42], "must be a string"),
    (["[abc]"], "is not a host name"),
    (["..."], "is not a host name"),
    (["-"], "is not a host name"),
    (["a-.example.com"], "is not a host name"),
    (["*"], "is not a host name"),
    (["*.*.example.com"], "is not a host name"),
])
def test_a_bad_host_is_refused_by_name(hosts: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        sa.session(http=hosts)


def test_a_credential_cannot_be_keyed() -> None:
    with pytest.raises(ValueError, match="'Authorization' is a credential"):
        ReceiptTransport(key_headers=["Authorization"])
    with pytest.raises(TypeError, match="tool_name"):
        ReceiptTransport(tool_name="x")
    with pytest.raises(TypeError, match="take no share_failures"):
        ReceiptTransport(share_failures=True)


def test_other_methods_run_in_record_and_are_refused_in_replay(tmp_path: Any) -> None:
    provider = Provider()
    db = str(tmp_path / "r.db")
    client = httpx2.Client(transport=ReceiptTransport(provider.mock(httpx2)))
    with sa.session(db):
        client.get("https://api.openai.com/v1/models")
        for _ in range(2):
            client.delete("https://api.openai.com/v1/files/file-1")
    assert len(provider.seen) == 3
    with sa.session(db, mode="replay"):
        client.get("https://api.openai.com/v1/models")  # a read: served
        with pytest.raises(ReplayMissError, match=r"http:api\.openai\.com: DELETE https://api"
                                                  r"\.openai\.com/v1/files/file-1 is never "
                                                  r"recorded \(HTTP receipts record GET, HEAD"):
            client.delete("https://api.openai.com/v1/files/file-1")
    assert len(provider.seen) == 3


def test_receipts_hold_json_answers_as_sent(sf: Singleflight) -> None:
    provider = Provider()
    client = httpx2.Client(transport=ReceiptTransport(provider.mock(httpx2), sf=sf))
    body = {"model": "claude-x", "messages": MESSAGES}
    answers = [client.post("https://api.anthropic.com/v1/messages", json=body) for _ in range(2)]
    assert answers[0].content == answers[1].content
    assert json.loads(answers[1].content)["usage"] == {"input_tokens": 17, "output_tokens": 9}
    assert "x-request-id" not in answers[1].headers and "set-cookie" not in answers[1].headers


@pytest.mark.slow
def test_a_child_process_that_imports_the_package_is_routed_too(tmp_path: Any) -> None:
    child = ("import sys, httpx, singleflight_agents\n"
             "r = httpx.post(sys.argv[1] + '/v1/messages', json={'model': 'claude-x', "
             "'messages': []})\n"
             "print(r.json()['usage']['output_tokens'])\n")
    with Server() as server, sa.session(str(tmp_path / "r.db"), http=["127.0.0.1", "[::1]"]):
        httpx.post(server.url + "/v1/messages", json={"model": "claude-x", "messages": []})
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", child, server.url], capture_output=True,
                                 text=True, timeout=60, check=True)
            assert out.stdout.strip() == "9"
        assert len(server.provider.seen) == 1


def test_gemini_generate_content_and_its_stream_replay(sf: Singleflight) -> None:
    genai = pytest.importorskip("google.genai", reason="google-genai is not installed")
    from google.genai import types

    provider = Provider()
    for key in ("AIza-key-one", "AIza-key-two"):
        client = genai.Client(api_key=key, http_options=types.HttpOptions(
            httpx_client=httpx2.Client(transport=ReceiptTransport(provider.mock(httpx2), sf=sf))))
        reply = client.models.generate_content(model="gemini-2.5-flash", contents="hello")
        assert reply.text == "echo: hello"
        streamed = client.models.generate_content_stream(model="gemini-2.5-flash",
                                                         contents="hello")
        assert "".join(chunk.text or "" for chunk in streamed) == "echo: hello"
    assert len(provider.seen) == 2
    assert "AIza" not in _stored_text(sf)
    row = sf.summary()["tools"]["model:gemini-2.5-flash"]
    assert (row["executed"], row["cache_hits"], row["tokens_in"], row["tokens_out"]) == (2, 2, 16, 8)


def test_the_session_ttl_is_the_lifetime_of_its_http_receipts(tmp_path: Any) -> None:
    with Server() as server, sa.session(str(tmp_path / "r.db"), http="127.0.0.1",
                                        ttl=86400) as session:
        httpx.post(server.url + "/v1/messages", json={"model": "claude-x", "messages": []})
        receipts = list(session.engine.store.iter_receipts())
    assert [round(r.expires_at - r.created_at) for r in receipts] == [86400]
    with pytest.raises(ValueError, match="ttl"):
        sa.session(ttl=-1)


@pytest.mark.slow
def test_an_sdk_retrying_a_replay_miss_misses_each_attempt(tmp_path: Any) -> None:
    provider = Provider()
    db = str(tmp_path / "r.db")
    with sa.session(db):
        _openai(None, provider).models.list()
    with (sa.session(db, mode="replay") as session, session.scope("one test") as scope,
          pytest.raises(anthropic.APIConnectionError)):
        _anthropic(None, provider).messages.create(model="claude-x", max_tokens=8,
                                                   messages=MESSAGES)
    assert len(scope.misses) == 3  # the SDK's two retries (the plugin lists the miss once)
    assert len({str(miss) for miss in scope.misses}) == 1 and "claude-x" in str(scope.misses[0])
