"""MCP tools through receipts, against a real MCP server (tests/_mcp_server.py) over stdio and
over streamable HTTP on 127.0.0.1: shared, recorded, replayed without the server, flags from
the tools' annotations; the ``mcp`` client wrapper and the Agents SDK's ``MCPServer`` wrapper."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, STORES_REDIS_SLOW, store_url_of
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client

from singleflight_agents import ReplayMissError, Session, Singleflight
from singleflight_agents.adapters import receipt_mcp_client, receipt_mcp_server
from singleflight_agents.adapters.mcp import ServerNotStarted

SERVER = Path(__file__).with_name("_mcp_server.py")
MISS = "no receipt to replay"


def calls(log: Path) -> Counter[str]:
    """What the server ran, by tool (``tools/list`` included)."""
    if not log.exists():
        return Counter()
    return Counter(json.loads(line)[0] for line in log.read_text().splitlines())


def pids(log: Path) -> set[int]:
    """The server processes that ran something."""
    return {json.loads(line)[2] for line in log.read_text().splitlines()}


def params(log: Path, script: Path = SERVER, **env: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[str(script), "stdio"],
                                 env={"MCP_TEST_LOG": str(log), **env})


def replay(store_url: str) -> Session:
    return Session(store_url, mode="replay", secret=SECRET)


def wire(result: Any) -> Any:
    return result.model_dump(mode="json", by_alias=True, exclude_unset=True)


@pytest.fixture(params=STORES_REDIS_SLOW)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store, Redis and others in the full run only: each test starts a server."""
    return store_url_of(request, tmp_path)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "calls.log"


@pytest.fixture
def script(tmp_path: Path) -> Path:
    """A copy of the server the test may delete."""
    copy = tmp_path / "server_copy.py"
    shutil.copy(SERVER, copy)
    return copy


# -- the mcp client: sharing and exact round trips -----------------------------------------------


async def test_identical_calls_run_once_and_results_round_trip_exactly(
        sf: Singleflight, log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests") as client:
        assert not client.connected  # nothing started before a call needs the server
        slow = await asyncio.gather(*[client.call_tool("slow", {"query": "a"}) for _ in range(5)])
        assert {r.content[0].text for r in slow} == {"slow answer for a"}  # type: ignore[union-attr]
        live = await client.call_tool("chart", {"name": "x"})
        served = await client.call_tool("chart", {"name": "x"})
        # An omitted default (limit=3 in the tool's schema) and key order: the same call.
        first = await client.call_tool("search", {"query": "q"})
        second = await client.call_tool("search", {"limit": 3, "query": "q"})
        assert client.connected
    assert not client.connected
    assert served == live and wire(served) == wire(live)
    image = served.content[1]
    assert image.type == "image" and image.mime_type == "image/png"
    assert image.data == live.content[1].data and image.meta == {"dpi": 72}  # type: ignore[union-attr]
    assert served.structured_content == {"name": "x", "points": [1, 2.5, None, {"x": None}]}
    assert served.meta is not None and served.meta["nested"] == {"none": None}
    assert second == first and first.structured_content["hits"] == ["q-0", "q-1", "q-2"]
    assert calls(log) == {"tools/list": 1, "slow": 1, "chart": 1, "search": 1}
    tools = sf.summary()["tools"]
    assert (tools["mcp:tests/slow"]["executed"], tools["mcp:tests/slow"]["shared_waits"]) == (1, 4)
    assert (tools["mcp:tests/chart"]["calls"], tools["mcp:tests/chart"]["cache_hits"]) == (2, 1)
    assert tools["mcp:tests:tools/list"]["executed"] == 1


@pytest.mark.slow
async def test_neither_json_rpc_ids_nor_sessions_are_keyed(sf: Singleflight, log: Path) -> None:
    answers = []
    for _ in range(2):  # two server processes, two sessions, new request ids
        async with receipt_mcp_client(sf, params(log), name="tests") as client:
            await client.call_tool("weather", {"city": "Oslo"})  # a request id used up
            answers.append(await client.call_tool("search", {"query": "q"}))
    assert answers[0] == answers[1]
    # Each client read the listing once (in record mode, flags come from the server itself).
    assert calls(log) == {"tools/list": 2, "weather": 1, "search": 1}
    stored = {r.tool_name: r.inputs for r in sf.store.iter_receipts()}
    assert stored["mcp:tests/search"] == '{"arguments":{"limit":3,"query":"q"}}'
    assert stored["mcp:tests:tools/list"] == '{"cursor":null}'


async def test_redact_keeps_an_argument_out_of_the_receipt(sf: Singleflight, log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests",
                                  tools={"search": {"redact": ["query"]}}) as client:
        for query in ("secret-one", "secret-two", "secret-one"):
            await client.call_tool("search", {"query": query})
    assert calls(log)["search"] == 2  # the key still covers the real value
    stored = [r.inputs or "" for r in sf.store.iter_receipts() if r.tool_name == "mcp:tests/search"]
    assert stored == ['{"arguments":{"limit":3,"query":"[redacted]"}}'] * 2


# -- flags from annotations ------------------------------------------------------------------------


@pytest.mark.slow
async def test_annotations_map_to_flags_and_tools_overrides_them(sf: Singleflight,
                                                                 log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests") as client:
        flags = {tool: (o.bounded_read, o.side_effecting, o.shared)
                 for tool in ("search", "weather", "delete", "note", "lookup")
                 for o in [await client.tool_options(tool)]}
    assert flags == {"search": (True, False, True), "weather": (True, False, True),
                     "delete": (False, True, False), "note": (False, False, False),
                     "lookup": (False, False, False)}  # idempotent alone: still a write
    overrides = {"note": {"deterministic": True}, "delete": {"deterministic": True},
                 "search": {"bounded_read": False}, "weather": {"ttl": 5}}
    async with receipt_mcp_client(sf, params(log), name="tests", tools=overrides) as client:
        note, delete = await client.tool_options("note"), await client.tool_options("delete")
        search, weather = await client.tool_options("search"), await client.tool_options("weather")
    assert note.shared and note.tool_name == "mcp:tests/note"
    assert not delete.shared  # destructiveHint still says side_effecting: it always wins
    assert not search.shared
    assert weather.shared and weather.ttl_seconds == 5
    assert calls(log) == {"tools/list": 2}  # record mode: each client read the server's flags


async def test_a_tools_entry_naming_no_listed_tool_warns(sf: Singleflight, log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests",
                                  tools={"serach": {"bounded_read": True}}) as client:
        with pytest.warns(RuntimeWarning, match="tools= names 'serach'"):
            await client.tool_options("search")


def test_bad_options_are_refused_by_name(sf: Singleflight, tmp_path: Path) -> None:
    target = params(tmp_path / "log")
    with pytest.raises(TypeError, match=r"tools\['search'\]: unknown tool option\(s\) bounded_reed"):
        receipt_mcp_client(sf, target, tools={"search": {"bounded_reed": True}})
    with pytest.raises(TypeError, match="tools=: 'search' must be a tool name mapped"):
        receipt_mcp_client(sf, target, tools={"search": True})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"tools\['search'\]: .*ttl_seconds"):
        receipt_mcp_client(sf, target, tools={"search": {"ttl": -1}})
    with pytest.raises(TypeError, match="sets tool_name itself"):
        receipt_mcp_client(sf, target, tool_name="x")
    with pytest.raises(TypeError, match=r"tools\['a'\]: meter is set by the wrapper"):
        receipt_mcp_client(sf, target, tools={"a": {"meter": len}})
    with pytest.raises(TypeError, match="mode= is not a tool option"):
        receipt_mcp_client(sf, target, mode="replay")
    with pytest.raises(TypeError, match="pass name="):
        receipt_mcp_client(sf, lambda: None)
    with pytest.raises(TypeError, match="takes a StdioServerParameters"):
        receipt_mcp_client(sf, 42, name="x")
    with pytest.raises(TypeError, match="expected a Singleflight engine"):
        receipt_mcp_client(object(), target)
    for unprintable in ("a\nb", "a\x85b", "a\x9b31mb", "a\u2028b", "a\tb"):  # NEL, CSI, LS
        with pytest.raises(ValueError, match="not printable: pass name= a single line"):
            receipt_mcp_client(sf, target, name=unprintable)
    with pytest.raises(TypeError, match=r"^receipt_mcp_client\(\) cannot reconnect an mcp.Client "
                                        r"built on a .*: pass the StdioServerParameters or URL"):
        receipt_mcp_client(sf, Client(stdio_client(target)), name="x")  # opens once
    with pytest.raises(TypeError, match=r"^receipt_mcp_client\(\) redact= takes a list .*got int$"):
        receipt_mcp_client(sf, target, redact=5)
    with pytest.raises(TypeError, match=r"tools\['a'\]: redact= takes a list .*got str$"):
        receipt_mcp_client(sf, target, tools={"a": {"redact": "query"}})
    with pytest.raises(ValueError, match="listing_ttl= must be a number of seconds"):
        receipt_mcp_client(sf, target, listing_ttl=-1)


def test_server_names_hold_no_credentials(sf: Singleflight) -> None:
    stdio = StdioServerParameters(command="/usr/local/bin/node", env={"API_KEY": "sk-env"},
                                  args=["server.js", "--api-key=sk-1", "--token", "abc", "-v"])
    assert receipt_mcp_client(sf, stdio).name == \
        "stdio:node server.js --api-key=<redacted> --token <redacted> -v"
    url = "https://user:pw@mcp.example.com:8443/mcp;jsessionid=S1?token=abc#x"
    assert receipt_mcp_client(sf, url).name == "https://mcp.example.com:8443/mcp"
    assert receipt_mcp_client(sf, Client(url)).name == "https://mcp.example.com:8443/mcp"
    assert receipt_mcp_client(sf, url, name="docs").name == "docs"
    with pytest.raises(ValueError, match="not an http"):
        receipt_mcp_client(sf, "stdio://x")
    docker = StdioServerParameters(command="docker", args=[
        "run", "-i", "-e", "GITHUB_PERSONAL_ACCESS_TOKEN=ghp_SECRET1", "--env=DB=postgres://u:pw@h/db",
        "-e", "HOME", "-e", "REGION=eu-west-1", "ghcr.io/github/github-mcp-server"])
    assert receipt_mcp_client(sf, docker).name == (
        "stdio:docker run -i -e GITHUB_PERSONAL_ACCESS_TOKEN=<redacted> --env=DB=postgres://h/db "
        "-e HOME -e REGION=eu-west-1 ghcr.io/github/github-mcp-server")
    remote = StdioServerParameters(command="npx", args=[
        "-y", "mcp-remote", "https://user:pw@mcp.example.com/sse?token=SECRET2#f",
        "--header", "Authorization: Bearer SECRET3", "-H", "X-Api-Key:SECRET4",
        "--header=Cookie: a=SECRET5", "X-Auth-Token: SECRET6", "AUTH_TOKEN=SECRET7",
        "--url=https://mcp.example.com/u/Zx9Kq2Lm8Np4Rt6Vw1Yb3Cd5/sse", "sk-proj-SECRET8",
        "localhost:8080", "server-2024-production-v2", "-HX-Goog-Api-Key: SECRET9"])
    named = receipt_mcp_client(sf, remote).name
    assert named == (
        "stdio:npx -y mcp-remote https://mcp.example.com/sse --header Authorization: <redacted> "
        "-H X-Api-Key:<redacted> --header=Cookie: <redacted> X-Auth-Token: <redacted> "
        "AUTH_TOKEN=<redacted> --url=https://mcp.example.com/u/Zx9Kq2Lm8Np4Rt6Vw1Yb3Cd5/sse "
        "<redacted> localhost:8080 server-2024-production-v2 -HX-Goog-Api-Key:<redacted>")
    assert "SECRET" not in named and "pw" not in named
    assert receipt_mcp_client(sf, "https://actions.zapier.com/mcp/sk-ak-SECRET9/sse").name == \
        "https://actions.zapier.com/mcp/<redacted>/sse"


NOT_CREDENTIALS = [  # each pair: two different servers, which must keep different names
    ["--max-tokens", "100"], ["--max-tokens", "4000"], ["--author", "alice"], ["--author", "bob"],
    ["--keyword=refund"], ["--keyword=billing"], ["--sort-key", "date"], ["--sort-key", "name"],
    ["--tokenizer", "cl100k_base"], ["--tokenizer", "o200k_base"], ["--monkey-patch", "yes"],
    ["--monkey-patch", "no"], ["--pwd", "/srv/a"], ["--pwd", "/srv/b"],
    ["--no-auth", "--port", "8080"], ["--no-auth", "--port", "9090"],
    ["--model", "gpt-4o-mini-2024-07-18"], ["--model", "gpt-4o-mini-2024-08-06"],
    ["--project", "123e4567-e89b-12d3-a456-426614174000"],
    ["--project", "987e6543-e21b-12d3-a456-426614174999"],
    ["--rev", "3f2a9c1d4b5e6f708192a3b4c5d6e7f8091a2b3c"],
    ["--rev", "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d"],
    ["ghcr.io/x/mcp@sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"],
    ["ghcr.io/x/mcp@sha256:0c8a3e1f2b9d4c6e8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f"],
    ["/tmp/aB3dE5fG7hJ9kL1mN3pQ"], ["/tmp/xY9wV7uT5sR3qP1oN2mL"],
    ["-e", "REGION=us-east-1"], ["-e", "REGION=eu-west-1"],
    ["--header", "X-Tenant: acme"], ["--header", "X-Tenant: globex"],
    ["sk-learn-mcp-server"], ["hf_mcp_server"], ["--token", "--verbose"], ["--verbose"]]


def test_default_names_mask_no_value_that_is_not_a_credential(sf: Singleflight) -> None:
    names = [receipt_mcp_client(sf, StdioServerParameters(command="srv", args=args)).name
             for args in NOT_CREDENTIALS]
    assert "<redacted>" not in " ".join(names)
    assert len(set(names)) == len(names)  # no two different servers share receipts
    assert names[0] == "stdio:srv --max-tokens 100"
    assert names[-2] == "stdio:srv --token --verbose"  # a flag is no value


def test_default_names_mask_credentials_inside_json_connection_strings_and_flags(
        sf: Singleflight) -> None:
    def name(*args: str) -> str:
        return receipt_mcp_client(sf, StdioServerParameters(command="srv", args=list(args))).name

    assert name("--config", '{"tavilyApiKey":"tvly-dev-Ab12","max":3}') == \
        'stdio:srv --config {"tavilyApiKey":"<redacted>","max":3}'  # Smithery
    assert name('--config={"model": "gpt-4o", "llm": {"key": "sk-proj-Ab12Cd34"}}') == \
        'stdio:srv --config={"model": "gpt-4o", "llm": {"key": "<redacted>"}}'
    assert name('{"headers": {"Authorization": "Bearer xyz"}, "x": "sk-proj-Q9"}') == \
        'stdio:srv {"headers": {"Authorization": "<redacted>"}, "x": "<redacted>"}'
    assert name("--connection-string", "Server=db;User Id=sa;Password=Tr0ub4dor&3;") == \
        "stdio:srv --connection-string Server=db;User Id=sa;Password=<redacted>;"
    assert name("--dsn", "host=db user=app password=Tr0ub4dor&3 dbname=x") == \
        "stdio:srv --dsn host=db user=app password=<redacted> dbname=x"
    assert name("--dsn=host=db password='a b' port=5432") == \
        "stdio:srv --dsn=host=db password=<redacted> port=5432"
    assert name("AccountName=a;AccountKey=Zm9v/YmFy==;EndpointSuffix=core.windows.net") == \
        "stdio:srv AccountName=a;AccountKey=<redacted>;EndpointSuffix=core.windows.net"
    assert name("--api-key:VALUE1", "-token", "v2", "--client-secret", "v3", "DB_PWD=v4") == \
        "stdio:srv --api-key:<redacted> -token <redacted> --client-secret <redacted> DB_PWD=<redacted>"
    assert name("https://u:pw@h/a;jsessionid=S1/mcp;v=2", "https://h/mcp/token/T1") == \
        "stdio:srv https://h/a/mcp https://h/mcp/token/<redacted>"
    assert name("ghp_Ab12", "xoxb-12-ab", "AKIAIOSFODNN7EXAMPLE", "eyJhbGciOiJI.eyJzdWIi.c2ln",
                "Bearer Tk1") == "stdio:srv " + " ".join(["<redacted>"] * 4) + " Bearer <redacted>"
    # A server whose only difference is its key is the same server: a rotated key keeps it.
    assert name("--api-key", "sk-old-Key1") == name("--api-key", "sk-new-Key2")


@pytest.mark.slow
async def test_a_tool_that_turned_destructive_runs_in_the_next_record_run_and_replay_follows(
        sf: Singleflight, store_url: str, log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="pay") as client:
        first = await client.call_tool("charge", {"amount": 5})  # read-only: recorded
    flipped = params(log, MCP_TEST_FLIP="1")  # the next run: the server says destructive
    async with receipt_mcp_client(sf, flipped, name="pay") as client:
        options = await client.tool_options("charge")
        assert options.side_effecting and not options.shared
        second = await client.call_tool("charge", {"amount": 5})
    assert second != first and calls(log)["charge"] == 2  # it ran, in the new process
    with replay(store_url):  # replay follows the listing the last record run stored
        async with receipt_mcp_client(sf, flipped, name="pay") as client:
            with pytest.raises(ServerNotStarted, match="a side-effecting call runs in every"):
                await client.call_tool("charge", {"amount": 5})
    # listing_ttl= trusts a recent stored listing outside replay instead: no server started.
    async with receipt_mcp_client(sf, params(log), name="pay", listing_ttl=3600) as client:
        assert (await client.tool_options("charge")).side_effecting
        assert not client.connected
    assert calls(log) == {"tools/list": 2, "charge": 2}


@pytest.mark.slow
async def test_a_tool_the_server_added_replays_after_the_record_run_the_miss_asks_for(
        sf: Singleflight, store_url: str, log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests") as client:
        searched = await client.call_tool("search", {"query": "q"})
    with replay(store_url) as run, run.scope("t") as scope:
        async with receipt_mcp_client(sf, params(log), name="tests") as client:
            with pytest.raises(ServerNotStarted, match=(
                    r"^mcp:tests/export: .*its recorded tool listing does not list 'export'; "
                    r"re-record with --singleflight-mode=record, which stores the server's")):
                await client.call_tool("export", {"name": "e"})
    assert [m.tool_name for m in scope.misses] == ["mcp:tests/export"]
    newer = params(log, MCP_TEST_NEW="1")
    async with receipt_mcp_client(sf, newer, name="tests") as client:  # what the miss says
        exported = await client.call_tool("export", {"name": "e"})
    with replay(store_url) as run, run.scope("t") as scope:
        async with receipt_mcp_client(sf, newer, name="tests") as client:
            assert await client.call_tool("export", {"name": "e"}) == exported
            assert await client.call_tool("search", {"query": "q"}) == searched
            assert "export" in [tool.name for tool in (await client.list_tools()).tools]
            assert not client.connected
    assert scope.misses == []
    assert (calls(log)["search"], calls(log)["export"]) == (1, 1)


async def test_the_listing_is_kept_as_long_as_the_longest_lived_call(
        sf: Singleflight, log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests", ttl=60,
                                  tools={"weather": {"ttl": 7200}}) as client:
        await client.tool_options("weather")
    (listing,) = [r for r in sf.store.iter_receipts() if r.tool_name == "mcp:tests:tools/list"]
    assert listing.expires_at - listing.created_at == pytest.approx(7200)


# -- what always runs, and what is never stored ------------------------------------------------------


async def test_destructive_and_unannotated_tools_run_every_call(sf: Singleflight,
                                                                log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests") as client:
        for _ in range(2):
            await client.call_tool("delete", {"path": "/tmp/x"})
            await client.call_tool("note", {"text": "hi"})
        await asyncio.gather(*[client.call_tool("delete", {"path": "/tmp/x"}) for _ in range(3)])
    assert calls(log) == {"tools/list": 1, "delete": 5, "note": 2}
    tools = sf.summary()["tools"]
    assert (tools["mcp:tests/delete"]["calls"], tools["mcp:tests/delete"]["unshared"]) == (5, 5)
    assert not [r for r in sf.store.iter_receipts() if r.tool_name != "mcp:tests:tools/list"]


async def test_an_is_error_result_reaches_its_callers_and_is_never_stored(
        sf: Singleflight, log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests") as client:
        sequential = [await client.call_tool("fails", {"reason": "r"}) for _ in range(2)]
        together = await asyncio.gather(*[client.call_tool("fails", {"reason": "s"})
                                          for _ in range(3)])
    for result in [*sequential, *together]:
        assert result.is_error and result.content[0].text.startswith("failed: ")  # type: ignore[union-attr]
    assert together[0] == together[2]  # the callers in flight got the owner's result
    assert calls(log)["fails"] == 2 + 1
    assert [r.tool_name for r in sf.store.iter_receipts()] == ["mcp:tests:tools/list"]


# -- replay: the server is never started or contacted ------------------------------------------


async def test_replay_serves_everything_with_the_server_removed(
        sf: Singleflight, store_url: str, log: Path, script: Path) -> None:
    async with receipt_mcp_client(sf, params(log, script), name="tests") as client:
        recorded = [await client.call_tool("chart", {"name": "x"}),
                    await client.call_tool("search", {"query": "q"}),
                    await client.list_tools()]
    before = calls(log)
    script.unlink()
    with replay(store_url) as run, run.scope("t") as scope:
        async with receipt_mcp_client(sf, params(log, script), name="tests") as client:
            served = [await client.call_tool("chart", {"name": "x"}),
                      await client.call_tool("search", {"query": "q", "limit": 3}),
                      await client.list_tools()]
            with pytest.raises(ReplayMissError, match=rf"^mcp:tests/search: {MISS}"):
                await client.call_tool("search", {"query": "new"})
            with pytest.raises(ServerNotStarted, match=r"^mcp:tests/delete: replay never starts.*"
                               r"tools=\{'delete': \{'side_effecting': False, 'deterministic'"):
                await client.call_tool("delete", {"path": "x"})
            with pytest.raises(ReplayMissError, match=r"^mcp:tests/note: declares no safety flag"):
                await client.call_tool("note", {"text": "x"})
            assert not client.connected
    assert served == recorded
    assert calls(log) == before
    assert [m.tool_name for m in scope.misses] == ["mcp:tests/search", "mcp:tests/delete",
                                                   "mcp:tests/note"]
    assert [str(o.source) for o in scope.outcomes] == ["cache_hit"] * 4  # listing, 2 calls, page


async def test_a_connected_session_is_sent_nothing_in_replay(
        sf: Singleflight, store_url: str, log: Path) -> None:
    async with Client(params(log)) as connected:
        wrapped = receipt_mcp_client(sf, connected.session, name="tests")
        recorded = await wrapped.call_tool("search", {"query": "q"})
        assert calls(log) == {"tools/list": 1, "search": 1}
        with replay(store_url):
            again = receipt_mcp_client(sf, connected.session, name="tests")
            assert await again.call_tool("search", {"query": "q"}) == recorded
            with pytest.raises(ServerNotStarted):
                await again.call_tool("delete", {"path": "x"})
            await again.close()  # the user's session stays open
        assert calls(log) == {"tools/list": 1, "search": 1}
        assert (await connected.call_tool("weather", {"city": "Rome"})).content
        with pytest.raises(TypeError, match="pass name="):
            receipt_mcp_client(sf, connected.session)


async def test_a_connect_function_is_called_only_when_a_call_must_run(
        sf: Singleflight, store_url: str, log: Path) -> None:
    opened: list[int] = []

    def connect() -> Client:
        opened.append(1)
        return Client(params(log))

    async with receipt_mcp_client(sf, connect, name="tests") as client:
        await client.call_tool("search", {"query": "q"})
        await client.call_tool("search", {"query": "q"})
    assert opened == [1]
    with replay(store_url):
        async with receipt_mcp_client(sf, connect, name="tests") as client:
            await client.call_tool("search", {"query": "q"})
    assert opened == [1]


@pytest.mark.slow
async def test_a_server_that_died_is_started_again_by_the_next_call(
        sf: Singleflight, log: Path) -> None:
    async with receipt_mcp_client(sf, params(log), name="tests") as client:
        await client.call_tool("search", {"query": "a"})
        crashed = await asyncio.gather(*[client.call_tool("crash", {"reason": "r"})
                                         for _ in range(2)], return_exceptions=True)
        assert [type(e) for e in crashed] == [MCPError, MCPError] and not client.connected
        again = await client.call_tool("search", {"query": "b"})
        assert again.structured_content == {"query": "b", "hits": ["b-0", "b-1", "b-2"]}
        assert client.connected
    assert calls(log)["crash"] == 1 and len(pids(log)) == 2


@pytest.mark.slow
def test_an_unentered_client_is_copied_for_each_connection(sf: Singleflight, log: Path) -> None:
    given = Client(params(log))
    client = receipt_mcp_client(sf, given, name="tests")

    async def search(*queries: str) -> list[str]:
        found = []
        for query in queries:  # close() between two calls: the next opens another connection
            found.append((await client.call_tool("search", {"query": query})).structured_content)
            await client.close()
        return [answer["query"] for answer in found if answer]

    assert asyncio.run(search("a", "b")) == ["a", "b"]
    assert asyncio.run(search("c")) == ["c"]  # another event loop
    assert not client.connected and len(pids(log)) == 3
    with pytest.raises(RuntimeError, match="within an async context manager"):
        given.session  # noqa: B018  (the user's Client was never entered)


# -- streamable HTTP ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def http_server(log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, str(SERVER), "http", str(port)],
                               env={**os.environ, "MCP_TEST_LOG": str(log)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("the MCP test server did not start")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/mcp", process
    process.kill()
    process.wait(10)


async def test_streamable_http_records_then_replays_with_the_server_stopped(
        sf: Singleflight, store_url: str, log: Path,
        http_server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, process = http_server
    async with receipt_mcp_client(sf, url) as client:
        assert client.name == url
        live = await asyncio.gather(*[client.call_tool("chart", {"name": "h"}) for _ in range(3)])
        await client.call_tool("delete", {"path": "p"})
    assert live[0] == live[2]
    assert calls(log) == {"tools/list": 1, "chart": 1, "delete": 1}
    process.kill()
    process.wait(10)
    with replay(store_url):
        async with receipt_mcp_client(sf, url) as client:
            assert await client.call_tool("chart", {"name": "h"}) == live[0]
            assert not client.connected
    assert sf.summary()["tools"][f"mcp:{url}/chart"]["executed"] == 1


# -- the Agents SDK --------------------------------------------------------------------------------


def _sdk() -> Any:
    return pytest.importorskip("agents")


def _stdio_server(log: Path, script: Path, **kwargs: Any) -> Any:
    from agents.mcp import MCPServerStdio

    return MCPServerStdio(name="tests", params={"command": sys.executable,
                                                "args": [str(script), "stdio"],
                                                "env": {"MCP_TEST_LOG": str(log)}}, **kwargs)


async def _run_agent(server: Any, steps: list[Any]) -> tuple[str, list[str]]:
    from agents import Agent, RunConfig, Runner
    from agents.items import ToolCallOutputItem
    from agents.testing import ScriptedModel

    agent = Agent(name="agent", model=ScriptedModel(steps), mcp_servers=[server])
    result = await Runner.run(agent, "go", run_config=RunConfig(tracing_disabled=True))
    return str(result.final_output), [str(item.output) for item in result.new_items
                                      if isinstance(item, ToolCallOutputItem)]


def _steps() -> list[Any]:
    from agents.testing import assistant_message, function_call

    return [[function_call("search", {"query": "q"}, call_id="c1"),
             function_call("search", {"query": "q"}, call_id="c2"),
             function_call("chart", {"name": "z"}, call_id="c3")],
            [function_call("weather", {"city": "Oslo"}, call_id="c4")],
            [assistant_message("done")]]


async def test_an_agent_records_then_replays_with_the_server_command_removed(
        sf: Singleflight, store_url: str, log: Path, script: Path) -> None:
    _sdk()
    from agents.mcp import MCPServer

    wrapped = receipt_mcp_server(sf, _stdio_server(log, script))
    assert isinstance(wrapped, MCPServer) and wrapped.name == "tests" and wrapped.label == "tests"
    async with wrapped:
        assert not wrapped.connected  # connect() defers to the first call that needs it
        recorded = await _run_agent(wrapped, _steps())
        assert wrapped.connected
    assert recorded[0] == "done" and len(recorded[1]) == 4 and "chart z" in recorded[1][2]
    assert calls(log) == {"tools/list": 1, "search": 1, "chart": 1, "weather": 1}
    script.unlink()
    with replay(store_url) as run, run.scope("t") as scope:
        inner = _stdio_server(log, script)
        async with receipt_mcp_server(sf, inner) as again:
            assert await _run_agent(again, _steps()) == recorded
            assert not again.connected and inner.session is None
        replayed = sf.summary()["tools"]["mcp:tests/search"]  # the session's run
    assert scope.misses == []
    assert calls(log) == {"tools/list": 1, "search": 1, "chart": 1, "weather": 1}
    assert (replayed["calls"], replayed["executed"], replayed["cache_hits"]) == (2, 0, 2)
    recording = sf.summary()["tools"]["mcp:tests/search"]
    assert (recording["calls"], recording["executed"]) == (2, 1)


async def test_the_sdk_server_filters_the_recorded_listing_and_a_write_never_runs_in_replay(
        sf: Singleflight, store_url: str, log: Path, script: Path) -> None:
    _sdk()
    from agents.testing import assistant_message, function_call

    keep = {"allowed_tool_names": ["search", "delete"]}
    async with receipt_mcp_server(sf, _stdio_server(log, script, tool_filter=keep)) as server:
        assert [t.name for t in await server.list_tools()] == ["search", "delete"]
        assert len(server.cached_tools or []) == 10  # recorded whole, filtered per agent
        deleted = await _run_agent(server, [[function_call("delete", {"path": "p"}, call_id="d1")],
                                            [assistant_message("ok")]])
    assert "deleted p" in deleted[1][0] and calls(log)["delete"] == 1
    script.unlink()
    with replay(store_url) as run, run.scope("t") as scope:
        async with receipt_mcp_server(sf, _stdio_server(log, script, tool_filter=keep)) as server:
            final, told = await _run_agent(server, [[function_call("delete", {"path": "p"},
                                                                  call_id="d1")],
                                                    [assistant_message("ok")]])
            assert not server.connected
    assert final == "ok" and "error" in told[0].lower()  # the SDK told the model ...
    assert [type(m) for m in scope.misses] == [ServerNotStarted]  # ... and the test fails
    assert calls(log)["delete"] == 1


@pytest.mark.slow
async def test_the_sdk_servers_filter_stays_on_it_however_often_it_is_wrapped(
        sf: Singleflight, log: Path, script: Path) -> None:
    _sdk()
    keep = {"allowed_tool_names": ["search", "delete"]}
    inner = _stdio_server(log, script, tool_filter=keep)
    for wrapped in (receipt_mcp_server(sf, inner), receipt_mcp_server(sf, inner),
                    receipt_mcp_server(sf, receipt_mcp_server(sf, inner))):
        async with wrapped:
            assert [t.name for t in await wrapped.list_tools()] == ["search", "delete"]
            assert len(wrapped.cached_tools or []) == 10 and wrapped.tool_filter is keep
        assert inner.tool_filter is keep
    await inner.connect()
    try:
        assert [t.name for t in await inner.list_tools()] == ["search", "delete"]
    finally:
        await inner.cleanup()


@pytest.mark.slow
async def test_the_sdk_wrapper_connects_again_when_its_server_died(
        sf: Singleflight, log: Path, script: Path) -> None:
    _sdk()
    async with receipt_mcp_server(sf, _stdio_server(log, script)) as server:
        await server.call_tool("search", {"query": "a"})
        with pytest.raises(MCPError, match="Connection closed"):
            await server.call_tool("crash", {"reason": "r"})
        again = await server.call_tool("search", {"query": "b"})
    assert again.structured_content == {"query": "b", "hits": ["b-0", "b-1", "b-2"]}
    assert len(pids(log)) == 2


async def test_a_late_failure_from_a_dead_sdk_connection_leaves_the_new_one_open(
        sf: Singleflight) -> None:
    _sdk()
    from agents.mcp import MCPServer
    from mcp.types import CallToolResult, TextContent, Tool

    class Flaky(MCPServer):
        """Its first connection is dead: a call on it fails, one of them late."""

        def __init__(self) -> None:
            super().__init__()
            self.session: int | None = None
            self.connections = 0
            self.waiting, self.release = asyncio.Event(), asyncio.Event()

        @property
        def name(self) -> str:
            return "flaky"

        async def connect(self) -> None:
            self.connections += 1
            self.session = self.connections

        async def cleanup(self) -> None:
            self.session = None

        async def list_tools(self, run_context: Any = None, agent: Any = None) -> list[Tool]:
            return [Tool(name="op", input_schema={"type": "object"})]  # unflagged: always runs

        async def call_tool(self, tool_name: str, arguments: dict[str, Any] | None,
                            meta: dict[str, Any] | None = None) -> CallToolResult:
            session = self.session
            if (arguments or {}).get("late"):
                self.waiting.set()
                await self.release.wait()
            if session == 1:
                raise MCPError(-32000, "Connection closed")
            return CallToolResult(content=[TextContent(text=f"on connection {session}")])

        async def list_prompts(self) -> Any:
            raise NotImplementedError

        async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
            raise NotImplementedError

    server = Flaky()
    async with receipt_mcp_server(sf, server) as wrapped:
        late = asyncio.create_task(wrapped.call_tool("op", {"late": True}))
        await server.waiting.wait()  # sent on the first connection
        with pytest.raises(MCPError, match="Connection closed"):
            await wrapped.call_tool("op", {})
        assert (await wrapped.call_tool("op", {})).content[0].text == "on connection 2"  # type: ignore[union-attr]
        server.release.set()
        with pytest.raises(MCPError, match="Connection closed"):
            await late  # the dead connection's late failure ...
        assert (await wrapped.call_tool("op", {})).content[0].text == "on connection 2"  # type: ignore[union-attr]
    assert server.connections == 2  # ... left the new one open


@pytest.mark.slow
def test_the_sdk_wrapper_connects_again_on_another_event_loop(
        sf: Singleflight, log: Path, script: Path) -> None:
    _sdk()
    server = receipt_mcp_server(sf, _stdio_server(log, script))

    async def search(query: str) -> Any:
        return (await server.call_tool("search", {"query": query})).structured_content

    assert [asyncio.run(search(q))["query"] for q in "abc"] == ["a", "b", "c"]
    asyncio.run(server.cleanup())
    assert not server.connected and server.server.session is None  # type: ignore[attr-defined]
    assert len(pids(log)) == 3


async def test_prompts_and_resources_are_refused_in_replay_under_the_servers_label(
        sf: Singleflight, store_url: str) -> None:
    _sdk()
    from agents.mcp import MCPServerStreamableHttp

    url = "https://user:hunter2@mcp.example.com/mcp?token=SECRET"
    await sf.execute(len, "x")  # replay needs a store that exists
    with replay(store_url) as run, run.scope("t") as scope:
        server = receipt_mcp_server(sf, MCPServerStreamableHttp(params={"url": url}))
        for request in (server.list_prompts, lambda: server.get_prompt("p"),
                        server.list_resources, server.list_resource_templates,
                        lambda: server.read_resource("file:///x")):
            with pytest.raises(ServerNotStarted):
                await request()
    label = "https://mcp.example.com/mcp"
    assert [m.tool_name for m in scope.misses] == [
        f"mcp:{label}:{method}" for method in ("prompts/list", "prompts/get", "resources/list",
                                               "resources/templates/list", "resources/read")]
    assert str(scope.misses[0]) == (
        f"mcp:{label}:prompts/list: replay never starts or contacts MCP server {label!r}, and "
        f"prompts and resources are not recorded; run it in record mode")


# -- imports, the demo, pytest-xdist -----------------------------------------------------------------


def test_importing_the_package_imports_neither_mcp_nor_agents() -> None:
    code = ("import sys, singleflight_agents, singleflight_agents.adapters as a\n"
            "assert 'mcp' not in sys.modules and 'agents' not in sys.modules, 'early'\n"
            "a.receipt_mcp_client\n"
            "assert 'mcp' in sys.modules and 'agents' not in sys.modules, 'client'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
async def test_the_demo_records_then_replays_without_its_server(sf: Singleflight) -> None:
    _sdk()
    from singleflight_agents.demo_mcp import run_mcp_demo

    lines: list[str] = []
    result = await run_mcp_demo(sf, emit=lines.append)
    assert (result["calls"], result["listings"], result["server_calls"]) == (7, 9, 3)
    assert (result["replay_server_calls"], result["replay_connected"]) == (0, False)
    assert result["summary"]["unique_executions"] == 4  # 3 calls and 1 listing, once
    assert "server started: no, tool calls run: 0" in lines[2]


@pytest.mark.slow
def test_the_demo_command_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sdk()
    from singleflight_agents.demo_mcp import main

    assert main(["--db", str(tmp_path / "r.db")]) == 0
    assert "mcp:help-center/search_docs" in capsys.readouterr().out


EVAL = '''
import asyncio
import os
import sys

import pytest
from mcp import StdioServerParameters

from singleflight_agents.adapters import receipt_mcp_client

SERVER = StdioServerParameters(command=sys.executable,
                               args=[os.environ["MCP_TEST_SERVER"], "stdio"],
                               env={"MCP_TEST_LOG": os.environ["MCP_TEST_LOG"]})


@pytest.mark.parametrize("i", range(6))
def test_eval(singleflight, i):
    query = "abc"[i % 3]

    async def ask():
        async with receipt_mcp_client(singleflight, SERVER, name="docs", cost=0.05) as client:
            return (await client.call_tool("search", {"query": query})).structured_content

    assert asyncio.run(ask())["query"] == query
    with open("workers.log", "a") as handle:
        handle.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
'''


@pytest.mark.slow
def test_an_eval_suite_records_once_under_xdist_then_replays_with_the_server_removed(
        pytester: pytest.Pytester, store_url: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, script: Path) -> None:
    pytest.importorskip("xdist")
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "PYTEST_XDIST_WORKER",
                 "PYTEST_XDIST_AUTO_NUM_WORKERS", "SINGLEFLIGHT_SESSION"):
        monkeypatch.delenv(name, raising=False)
    log = tmp_path / "server.log"
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", SECRET)  # a Redis store keeps no key file
    monkeypatch.setenv("MCP_TEST_SERVER", str(script))
    monkeypatch.setenv("MCP_TEST_LOG", str(log))
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_eval=EVAL)

    def run(*args: str) -> Any:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly",
                                             f"--singleflight-db={store_url}", "-n", "2", *args,
                                             timeout=180)

    recorded = run()
    recorded.assert_outcomes(passed=6)
    assert set((pytester.path / "workers.log").read_text().split()) == {"gw0", "gw1"}
    # One search per distinct call, across workers. The mcp client itself lists the tools once
    # on every connection that runs a tool (to validate structured output), so the server may
    # see up to one listing per executed search; in record mode each test's client reads our
    # listing from the server and stores it, unless it shares one in flight.
    recorded_calls = calls(log)
    assert recorded_calls["search"] == 3 and 1 <= recorded_calls["tools/list"] <= 6 + 3
    found = re.search(r"12 calls, (\d+) executed", recorded.stdout.str())
    assert found and 3 + 1 <= int(found.group(1)) <= 3 + 6

    script.unlink()  # the server's executable is gone
    replayed = run("--singleflight-mode=replay")
    replayed.assert_outcomes(passed=6)
    assert calls(log) == recorded_calls
    out = replayed.stdout.str()
    assert "12 calls, 0 executed" in out and "mcp:docs/search" in out
    assert "saved $0.30" in out  # six searches served from receipts


def test_no_warning_leaks_from_a_quiet_listing(sf: Singleflight, tmp_path: Path) -> None:
    """Building a client touches neither the server nor the store."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = receipt_mcp_client(sf, params(tmp_path / "log"), name="tests")
    assert not client.connected and not sf.opened
