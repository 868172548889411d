"""What identifies an HTTP request, and what of an exchange may be kept.

The key of a request is its method, scheme, host, path, sorted query, body (JSON by its
value: key order and ``1.0`` against ``1`` do not matter; any other body by its hash) and
the few headers that change the answer. The port is not keyed: a host means the same
service on any port, so calls recorded against one local server replay against another.
Never keyed, never kept: credentials (in headers, in the query, in the URL's user part) and
per-attempt headers (retry counts, idempotency keys, user agents, request ids). This module
imports no HTTP library: a request is read through the few attributes httpx and httpx2
share.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable
from typing import Any

# Headers that change the answer. Anything else in a request is either a credential, a
# per-attempt detail or client noise, and is left out of the key.
KEY_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
    "cookie", "x-auth-token", "x-amz-security-token",
})
# Query parameters that only ever carry a credential. Ambiguous names (``token``, ``code``) are
# keyed: a page token must not share a receipt with the next page. Their values reach the
# store only inside the key's SHA-256, never as text.
CREDENTIAL_PARAMS = frozenset({
    "key", "api_key", "api-key", "apikey", "access_token", "refresh_token", "id_token",
    "private_token", "auth", "client_secret", "secret", "password", "sig", "signature",
    "x-goog-api-key", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
})
# Response headers not kept: cookies, and what identifies one attempt or one account.
_DROPPED_RESPONSE = re.compile(r"^(set-cookie|set-cookie2|cf-ray|x-request-id|request-id|"
                               r"x-amzn-requestid|openai-organization|openai-project|"
                               r"anthropic-organization-id|x-goog-.*-id)$")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")  # one label of a host name
_GEMINI_MODEL = re.compile(r"/models/([^/:]+):")
# Which price list a host's models are in (genai-prices), where the host says it.
PROVIDERS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic",
             "generativelanguage.googleapis.com": "google"}
SHARED_METHODS = {"GET": "bounded_read", "HEAD": "bounded_read", "POST": "deterministic"}


class Hosts:
    """The hosts whose requests go through receipts: ``api.openai.com`` (any port) or
    ``*.openai.azure.com`` (any subdomain)."""

    def __init__(self, hosts: Iterable[str] | str = ()) -> None:
        if isinstance(hosts, str):
            hosts = hosts.split(",")
        names = [name for name in map(_check_host, hosts) if name]
        self.exact = frozenset(n for n in names if not n.startswith("*."))
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))

    def __contains__(self, host: str) -> bool:
        host = host.lower()
        return host in self.exact or (bool(self.suffixes) and host.endswith(self.suffixes))

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes)

    def __or__(self, other: Hosts) -> Hosts:
        return Hosts([*self.names(), *other.names()])

    def names(self) -> list[str]:
        """The hosts as they are written: ``[::1]`` for an IPv6 address."""
        return sorted(f"[{n}]" if ":" in n else n for n in self.exact) + \
            ["*" + s for s in self.suffixes]

    def __repr__(self) -> str:
        return f"Hosts({','.join(self.names())})"


def _check_host(host: object) -> str:
    if not isinstance(host, str):
        raise ValueError(f"an HTTP host must be a string like api.openai.com, got "
                         f"{type(host).__name__}")
    name = host.strip().lower()
    if not name:  # "a,,b" or a trailing comma
        return name
    if name.startswith("[") and name.endswith("]"):  # [::1]: httpx gives the host bare
        try:
            ipaddress.IPv6Address(name[1:-1])
            return name[1:-1]  # as written: httpx gives it the same way
        except ValueError:
            pass
    elif all(_LABEL.fullmatch(label) for label in name.removeprefix("*.").split(".")):
        return name
    raise ValueError(f"HTTP host {host!r} is not a host name: give it like api.openai.com, "
                     f"*.openai.azure.com or [::1] (no scheme, port or path)")


def check_key_headers(names: Iterable[str] | str) -> tuple[str, ...]:
    """The header names to key on, lower-cased (a string: one name, or several with commas);
    a credential is refused by name."""
    if isinstance(names, str):
        names = names.split(",")
    checked = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"key_headers= takes header names, got {name!r}")
        lower = name.strip().lower()
        if lower in CREDENTIAL_HEADERS:
            raise ValueError(f"header {name.strip()!r} is a credential: it is never keyed or stored "
                             f"(the same call with another key shares its receipt)")
        checked.append(lower)
    return tuple(checked)


class Described:
    """One request as receipts see it: its key, what a receipt or a message may show of
    it, the tool name it is counted under and how it is shared."""

    __slots__ = ("flag", "key", "model", "provider", "tool_name")

    def __init__(self, request: Any, body: bytes, key_headers: tuple[str, ...]) -> None:
        url = request.url
        method = str(request.method).upper()
        parsed = _body_value(body, request.headers.get("content-type", ""))
        self.model = _model_of(parsed, url.path)
        self.provider = PROVIDERS.get(url.host)
        # The path as sent (percent-encoded): /a%2Fb and /a/b are different resources.
        raw_path = url.raw_path.partition(b"?")[0].decode("ascii")
        path = f"{url.scheme}://{url.host}{raw_path}"
        # Sorted by name only: repeated parameters keep their order, which may matter.
        query = sorted(((k, "<redacted>" if k.lower() in CREDENTIAL_PARAMS else v)
                        for k, v in url.params.multi_items()), key=lambda item: item[0])
        headers = {name: request.headers.get(name) for name in key_headers
                   if name in request.headers}
        self.key: dict[str, Any] = {"method": method, "url": path, "query": query,
                                    "headers": headers, "body": parsed}
        # Counted per model where there is one (the report prices model rows), else per host.
        self.tool_name = f"model:{self.model}" if self.model else f"http:{url.host}"
        self.flag = SHARED_METHODS.get(method)


def _body_value(body: bytes, content_type: str) -> Any:
    """A JSON body as its value (numbers as JSON sees them); anything else by its hash."""
    if not body:
        return None
    if "json" in content_type.lower() or body[:1] in (b"{", b"["):
        try:
            return _json_numbers(json.loads(body))
        # Not JSON after all (or not UTF-8), or nested too deep to walk: keyed by its bytes.
        except (ValueError, RecursionError):
            pass
    return {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}


def _json_numbers(value: Any) -> Any:
    """``1.0`` as ``1``: the server parses the same number."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    return value


def _model_of(body: Any, path: str) -> str | None:
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(model, str) and model and model.isprintable():
        return model
    found = _GEMINI_MODEL.search(path)
    return found.group(1) if found else None


def kept_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[list[str]]:
    """The response headers a receipt keeps, in order (no cookies, no request ids)."""
    kept = []
    for name, value in raw:
        text = name.decode("latin-1")
        if not _DROPPED_RESPONSE.match(text.lower()):
            kept.append([text, value.decode("latin-1")])
    return kept


def shown(key: dict[str, Any]) -> dict[str, Any]:
    """For ``redact=``: what receipts and replay misses show of a request's key: never its
    body, which may hold anything the user sent."""
    url = key["url"]
    kept = {"method": key["method"], "url": url}
    model = _model_of(key["body"], url)
    return kept if model is None else {**kept, "model": model}
