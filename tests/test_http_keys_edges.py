"""HTTP receipts at the edges of keying and storing: encoded paths, repeated parameters,
ambiguous query names, redirects, 304s, deep bodies, headers of the call that sent."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from singleflight_agents import ReceiptTransport, Singleflight


class Server:
    """A mock server that answers each request with its own path and query, and counts."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.seen: list[str] = []
        self.answer = answer

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.url.raw_path.decode())
        if self.answer is not None:
            return self.answer(request)
        return httpx.Response(200, json={"path": request.url.raw_path.decode()},
                              headers={"set-cookie": "session=abc", "x-request-id": "req-1"})


def client(sf: Singleflight, server: Server, **options: Any) -> httpx.Client:
    return httpx.Client(transport=ReceiptTransport(httpx.MockTransport(server), sf=sf, **options),
                        base_url="https://api.example.com")


def test_an_encoded_slash_is_another_resource(sf: Singleflight) -> None:
    server = Server()
    http = client(sf, server)
    encoded = http.get("/projects/group%2Fproj").json()
    plain = http.get("/projects/group/proj").json()
    assert (encoded["path"], plain["path"]) == ("/projects/group%2Fproj", "/projects/group/proj")
    assert len(server.seen) == 2


def test_repeated_parameters_keep_their_order_and_others_may_move(sf: Singleflight) -> None:
    server = Server()
    http = client(sf, server)
    http.get("/v1/items?a=1&a=2&b=x")
    http.get("/v1/items?b=x&a=1&a=2")  # the same call: names sorted, repeats in order
    http.get("/v1/items?a=2&a=1&b=x")  # another call
    assert server.seen == ["/v1/items?a=1&a=2&b=x", "/v1/items?a=2&a=1&b=x"]


def test_page_tokens_are_keyed_and_credentials_are_not(sf: Singleflight) -> None:
    server = Server()
    http = client(sf, server)
    pages = [http.get(f"/v1/list?token=page{i}").json()["path"] for i in (1, 2)]
    assert pages == ["/v1/list?token=page1", "/v1/list?token=page2"]
    for secret in ("sig-one", "sig-two"):
        http.get(f"/v1/blob?X-Amz-Signature={secret}&refresh_token={secret}")
    assert len(server.seen) == 3  # two pages, one blob shared by both signatures
    stored = json.dumps([r.to_dict() for r in sf.store.iter_receipts()])
    assert "sig-one" not in stored and "sig-two" not in stored


def test_a_redirect_is_recorded_and_a_304_is_not(sf: Singleflight) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old":
            return httpx.Response(301, headers={"location": "/new"})
        if request.url.path == "/cached":
            return httpx.Response(304)
        return httpx.Response(200, text="new")

    server = Server(answer)
    http = client(sf, server)
    for _ in range(2):
        assert http.get("/old", follow_redirects=True).text == "new"
        assert http.get("/cached").status_code == 304
    assert server.seen == ["/old", "/new", "/cached", "/cached"]


DEEP_BODY = """
import httpx
from singleflight_agents import ReceiptTransport, Singleflight

seen = []
def answer(request):
    seen.append(1)
    return httpx.Response(200, text="ok")

with Singleflight(sys.argv[1], secret="s" * 20) as sf:
    http = httpx.Client(transport=ReceiptTransport(httpx.MockTransport(answer), sf=sf))
    deep = "[" * 5000 + "]" * 5000
    for _ in range(2):
        http.post("https://api.example.com/v1/deep", content=deep,
                  headers={"content-type": "application/json"})
print(len(seen))
"""


def test_a_body_nested_too_deep_to_walk_is_keyed_by_its_bytes(tmp_path: Path) -> None:
    # In a process of its own: CPython 3.11.7 can leave the ast module's recursion bookkeeping
    # off after a RecursionError, and a later import that pytest rewrites would then fail.
    run = subprocess.run([sys.executable, "-c", "import sys\n" + DEEP_BODY,
                          str(tmp_path / "r.db")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1"]


def test_the_call_that_sent_gets_its_cookies_and_later_calls_do_not(sf: Singleflight) -> None:
    http = client(sf, Server())
    sent = http.get("/v1/me")
    served = http.get("/v1/me")
    assert (sent.headers["set-cookie"], sent.headers["x-request-id"]) == ("session=abc", "req-1")
    assert "set-cookie" not in served.headers and "x-request-id" not in served.headers
    assert "session=abc" not in json.dumps([r.to_dict() for r in sf.store.iter_receipts()])


def test_key_headers_may_be_one_name_or_a_comma_list(sf: Singleflight) -> None:
    server = Server()
    http = client(sf, server, key_headers="x-tenant")
    for tenant in ("alice", "bob", "alice"):
        http.get("/v1/data", headers={"x-tenant": tenant})
    assert len(server.seen) == 2
    with pytest.raises(ValueError, match="'cookie' is a credential"):
        ReceiptTransport(key_headers="x-tenant, cookie")
