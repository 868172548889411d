"""HTTP receipts from the pytest plugin: ``--singleflight-http``, the ini key and the marker,
over a real HTTP server on 127.0.0.1 that counts the requests it sees."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from singleflight_agents.demo_provider import Server

EVAL = '''
import os

import openai
import pytest


def ask(question, stream=False):
    client = openai.OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "unset",
                           base_url=os.environ["PROVIDER_URL"] + "/v1", max_retries=0)
    messages = [{"role": "user", "content": question}]
    if stream:
        chunks = client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = client.chat.completions.create(model="gpt-4o", messages=messages)
    return reply.choices[0].message.content


@pytest.mark.parametrize("question", ["a", "b", "a", "b", "a", "c"])
def test_eval(question):
    assert ask(question) == "echo: " + question


@pytest.mark.parametrize("question", ["a", "a"])
def test_stream(question):
    assert ask(question, stream=True) == "echo: " + question + " "
'''

HTTP_PROJECTS = {"test_http_eval.py": EVAL}


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    with Server() as running:
        monkeypatch.setenv("PROVIDER_URL", running.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-plugin-test-key")
        monkeypatch.setenv("SINGLEFLIGHT_SECRET", "plugin-http-test-secret-0123456789")
        yield running


def _run(pytester: pytest.Pytester, *args: str) -> Any:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                         "-p", "no:recording", "--singleflight-db=r.db",
                                         "--singleflight-report=report.json", *args)


def _report(pytester: pytest.Pytester) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / "report.json").read_text())
    return data


@pytest.mark.slow
def test_record_once_then_replay_without_a_key_or_a_server(pytester: pytest.Pytester,
                                                           server: Server) -> None:
    pytester.makepyfile(**HTTP_PROJECTS)
    result = _run(pytester, "--singleflight-http=127.0.0.1")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["  prices: gpt-4o (genai-prices *)"])
    assert len(server.provider.seen) == 4  # a, b, c and one stream
    row = _report(pytester)["tools"]["model:gpt-4o"]
    assert (row["calls"], row["executed"]) == (8, 4)
    assert row["tokens_in_saved"] == 3 * 11  # the stream asked for no usage chunk
    os.environ.pop("OPENAI_API_KEY")
    _run(pytester, "--singleflight-http=127.0.0.1",
         "--singleflight-mode=replay").assert_outcomes(passed=8)
    assert len(server.provider.seen) == 4
    assert b"sk-plugin-test-key" not in (pytester.path / "r.db").read_bytes()


@pytest.mark.slow
def test_the_ini_key_routes_and_a_replay_miss_fails_its_test(pytester: pytest.Pytester,
                                                             server: Server) -> None:
    pytester.makeini("[pytest]\nsingleflight_http = 127.0.0.1 api.openai.com\n")
    pytester.makepyfile(**HTTP_PROJECTS)
    _run(pytester, "-k", "test_eval and not c").assert_outcomes(passed=5)
    assert len(server.provider.seen) == 2
    result = _run(pytester, "--singleflight-mode=replay", "-k", "test_eval")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*model:gpt-4o: no receipt to replay for arguments*POST*gpt-4o*"
                                 "127.0.0.1/v1/chat/completions*"])
    assert len(server.provider.seen) == 2


@pytest.mark.slow
def test_the_marker_routes_its_own_tests_only(pytester: pytest.Pytester, server: Server) -> None:
    pytester.makepyfile(test_marker='''
        import os

        import httpx
        import pytest


        def post():
            return httpx.post(os.environ["PROVIDER_URL"] + "/v1/messages",
                              json={"model": "claude-x", "messages": []}).json()


        @pytest.mark.singleflight(http=["127.0.0.1"])
        @pytest.mark.parametrize("n", range(3))
        def test_routed(n):
            assert post()["usage"] == {"input_tokens": 17, "output_tokens": 9}


        @pytest.mark.parametrize("n", range(2))
        def test_not_routed(n):
            post()
    ''')
    _run(pytester).assert_outcomes(passed=5)
    assert len(server.provider.seen) == 1 + 2


@pytest.mark.parametrize(("args", "message"), [
    (("--singleflight-http=https://api.openai.com",), "*singleflight http: HTTP host "
                                                      "'https://api.openai.com' is not a host*"),
    (("--singleflight-http=api.openai.com:443",), "*no scheme, port or path*"),
])
@pytest.mark.slow
def test_a_bad_host_is_one_line_before_any_test(pytester: pytest.Pytester, args: tuple[str, ...],
                                                message: str) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = _run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert "Traceback" not in result.stderr.str()


@pytest.mark.slow
def test_a_bad_marker_host_is_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x='''
        import pytest

        @pytest.mark.singleflight(http="https://x.example")
        def test_x():
            pass
    ''')
    result = _run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_x.py::test_x: @pytest.mark.singleflight(http=...): HTTP "
                                 "host 'https://x.example' is not a host name*"])


@pytest.mark.slow
def test_xdist_workers_make_one_request_per_distinct_call(pytester: pytest.Pytester,
                                                          server: Server) -> None:
    pytester.makepyfile(**HTTP_PROJECTS)
    _run(pytester, "--singleflight-http=127.0.0.1", "-n", "2").assert_outcomes(passed=8)
    assert len(server.provider.seen) == 4
    row = _report(pytester)["tools"]["model:gpt-4o"]
    assert (row["calls"], row["executed"]) == (8, 4)


@pytest.mark.slow
def test_a_miss_the_sdk_retried_is_listed_once(pytester: pytest.Pytester, server: Server) -> None:
    pytester.makepyfile(test_retry='''
        import os

        import anthropic


        def test_new_question():
            client = anthropic.Anthropic(api_key="unset", base_url=os.environ["PROVIDER_URL"])
            client.messages.create(model="claude-x", max_tokens=8,
                                   messages=[{"role": "user", "content": "never recorded"}])
    ''')
    (pytester.path / "r.db").write_bytes(b"")  # an empty store: every call misses
    result = _run(pytester, "--singleflight-http=127.0.0.1", "--singleflight-mode=replay",
                  "test_retry.py")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*model:claude-x: no receipt to replay*(3 attempts)"])
    assert server.provider.seen == []
