"""Default MCP server names without credentials: what a command line (:func:`stdio_label`), a
URL (:func:`url_label`) or a name given to the Agents SDK (:func:`text_label`) shows of the
server it reaches, each credential shown as ``<redacted>``.

A value is a credential when its name says so, or when it starts like a known kind of key;
nothing else is masked. The name is that of a flag (``--api-key x``, ``--token=x``,
``--api-key:x``), a variable (``-e GITHUB_TOKEN=x``, ``API_KEY=x``), a header (``-H
"Authorization: ..."``), a JSON key (``--config '{"tavilyApiKey": "x"}'``) or a key of a
``k=v`` list (``Server=db;Password=x``, ``host=db password=x``), taken word by word (``-``,
``_``, ``.`` and camelCase split it): its last word is token, secret, password, credential(s),
cookie, bearer, authorization, auth, pat, pwd, signature, or ``key`` after api, access, secret,
private, client... (``--sort-key`` is no credential; a variable ending in ``_KEY`` is). A key
starts with a known prefix (``sk-``, ``ghp_``, ``github_pat_``, ``glpat-``, ``xoxb-``,
``AIza``, ``AKIA``, ``tvly-``, ``hf_``, a JWT's ``eyJ``, ``Bearer ...``): random-looking text,
hex, UUIDs and digests are not keys. A URL loses its user part, path parameters, query and
fragment. A masked non-credential would let two different servers share a name, and so their
receipts; a server that differs only in its credential is the same server, and a rotated key
keeps its name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

__all__ = ["REDACTED", "credential_name", "key_like", "stdio_label", "text_label", "url_label"]

REDACTED = "<redacted>"

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")
_SECRET_WORDS = frozenset({
    "token", "secret", "password", "passwd", "passphrase", "pwd", "credential", "credentials",
    "cookie", "cookies", "bearer", "authorization", "auth", "pat", "jwt", "signature", "sig"})
_SECRET_ENDINGS = ("token", "secret", "password", "passwd", "apikey", "accesskey", "secretkey",
                   "privatekey", "authorization", "cookie")  # AUTHTOKEN, -HAuthorization: x
_KEY_QUALIFIERS = frozenset({
    "api", "access", "secret", "private", "client", "app", "application", "auth", "account",
    "service", "master", "signing", "encryption", "subscription", "license", "licence",
    "session", "shared", "consumer", "admin", "write", "deploy"})
_SWITCHES = frozenset({"no", "disable", "skip", "without", "enable", "use", "require", "allow"})
_VARIABLE = re.compile(r"[A-Z][A-Z0-9_]*")

_KEY_PREFIX = re.compile(
    r"(?:sk-(?:proj-|ant-|svcacct-|admin-)?|(?:sk|rk)_(?:live|test)_|gh[opusr]_|github_pat_|"
    r"glpat-|xox[abeoprs]-|tvly-|hf_|npm_|ya29\.|shpat_|shpss_|SG\.|pplx-|gsk_|r8_|nvapi-|"
    r"lin_api_|ntn_|sntrys_|dop_v1_)([\w.-]{4,})")
_FIXED_KEY = re.compile(r"(?:AKIA|ASIA)[A-Z0-9]{16}|AIza[\w-]{35}|eyJ[\w-]{4,}\.[\w-]+\.[\w-]*")
_PIECE = re.compile(r"[\w.-]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[\w.~+/=-]+")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_QUOTED_PAIR = re.compile(  # "name": value, in JSON or a Python dict
    r"""(["'])([^"'\\]*)\1(\s*:\s*)("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;}\]{\[]+)""")
_PAIR = re.compile(  # name=value in a ;-, space- or &-separated list
    r"""(?<![\w.])(-{0,2}[A-Za-z_][\w.-]*)([ \t]*=[ \t]*)"""
    r"""('[^']*'|"[^"]*"|\{[^}]*\}|(?:[^;\s,&'"]|&(?![A-Za-z_][\w.-]*=))*)""")
_FLAG_VALUE = re.compile(r"(-{1,2}[A-Za-z][\w.-]*)([=:])(.*)", re.DOTALL)
_FLAG = re.compile(r"-{1,2}[A-Za-z][\w.-]*")
_HEADER = re.compile(r"([A-Za-z][\w-]*)(\s*:\s*)(.*)", re.DOTALL)
_ASSIGN = re.compile(r"([A-Za-z_][\w.-]*)(=)(.*)", re.DOTALL)
_ENV_FLAGS, _HEADER_FLAGS = frozenset({"-e", "--env"}), frozenset({"-H", "--header"})
_PATH_NAMES = frozenset({"token", "key", "secret", "password", "apikey"})  # /token/<value>


def credential_name(name: str, *, flag: bool = False) -> bool:
    """Whether ``name`` (a flag without its dashes, a variable, a header, a JSON or ``k=v``
    key) names a credential, by its last word (``--no-auth`` and the like are switches)."""
    words = [word.lower() for word in _WORDS.findall(name)]
    if not words or (len(words) > 1 and words[0] in _SWITCHES):
        return False
    last = words[-1]
    if flag and words == ["pwd"]:
        return False  # --pwd: a working directory
    if last in _SECRET_WORDS or last.endswith(_SECRET_ENDINGS):
        return True
    if last == "key":
        return len(words) == 1 or words[-2] in _KEY_QUALIFIERS or bool(
            _VARIABLE.fullmatch(name.strip("-")))
    return False


def key_like(piece: str) -> bool:
    """Whether ``piece`` starts like a known kind of key (its body not plain lower-case words:
    ``sk-learn-server`` and ``hf_mcp_server`` are names)."""
    if _FIXED_KEY.fullmatch(piece):
        return True
    found = _KEY_PREFIX.fullmatch(piece)
    return found is not None and any(c.isupper() or c.isdigit() for c in found.group(1))


def text_label(text: str) -> str:
    """``text`` with its URLs shown by :func:`_url`, credential-named values in ``"name":
    value`` and ``name=value`` pairs, ``Bearer`` tokens and key-like pieces masked."""
    parts = re.split(f"({_URL.pattern})", text)
    return "".join(_url(part) if index % 2 else _plain(part) for index, part in enumerate(parts))


def _plain(text: str) -> str:
    text = _QUOTED_PAIR.sub(_quoted_pair, text)
    text = _PAIR.sub(_pair, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _PIECE.sub(lambda m: REDACTED if key_like(m.group()) else m.group(), text)


def _quoted_pair(found: re.Match[str]) -> str:
    quote, name, colon, value = found.groups()
    if not credential_name(name):
        return found.group()
    mark = value[0] if value[:1] in ("'", '"') else ""
    return f"{quote}{name}{quote}{colon}{mark}{REDACTED}{mark}"


def _pair(found: re.Match[str]) -> str:
    name, equals, value = found.groups()
    if not credential_name(name.lstrip("-")) or not value:
        return found.group()
    return f"{name}{equals}{REDACTED}"


def _url(url: str) -> str:
    """A URL without its user part, path parameters, query and fragment, credentials in its
    path masked."""
    try:
        parts = urlsplit(url)
        host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return REDACTED
    segments = [segment.partition(";")[0] for segment in parts.path.split("/")]
    shown = [REDACTED if index and segment and segments[index - 1].lower() in _PATH_NAMES
             else _plain(segment) for index, segment in enumerate(segments)]
    return f"{parts.scheme}://{host or ''}{port}{'/'.join(shown)}"


def url_label(url: str) -> str:
    """The URL without credentials: see :func:`_url`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"MCP server URL {_url(url)!r} is not an http(s) URL")
    return _url(url)


def stdio_label(command: str, args: Sequence[str]) -> str:
    """``stdio:<command's file name> <args>``, without credentials: the value after a flag
    that names one (``--token x``; a value starting with ``-`` is the next flag), the value
    of a credential-named ``-e``/``--env`` variable or ``-H``/``--header`` header, and what
    :func:`_argument` masks in each argument."""
    shown, follows = [text_label(os.path.basename(command))], ""
    for arg in args:
        if follows == "env":
            shown.append(_env(arg))
        elif follows == "header":
            shown.append(_header(arg))
        elif follows == "value" and not arg.startswith("-"):
            shown.append(REDACTED)
        else:
            shown.append(_argument(arg))
            follows = _what_follows(arg)
            continue
        follows = ""
    return "stdio:" + " ".join(shown)


def _what_follows(arg: str) -> str:
    if arg in _ENV_FLAGS:
        return "env"
    if arg in _HEADER_FLAGS:
        return "header"
    if _FLAG.fullmatch(arg) and credential_name(arg.lstrip("-"), flag=True):
        return "value"
    return ""


def _argument(arg: str) -> str:
    """One argument: ``--flag=value`` or ``--flag:value`` (masked when the flag names a
    credential: ``-eAPI_KEY=x`` and ``-HAuthorization: x`` too), a credential-named ``Name:
    value`` or ``NAME=value`` (masked whole), else what :func:`text_label` masks."""
    found = _FLAG_VALUE.fullmatch(arg)
    if found:
        flag, separator, value = found.groups()
        if flag in _ENV_FLAGS:
            return flag + separator + _env(value)
        if flag in _HEADER_FLAGS:
            return flag + separator + _header(value)
        if credential_name(flag.lstrip("-"), flag=True):
            return flag + separator + REDACTED
        return flag + separator + text_label(value)
    for pattern in (_HEADER, _ASSIGN):
        named = pattern.fullmatch(arg)
        if named and credential_name(named.group(1)):
            return named.group(1) + named.group(2) + REDACTED
    return text_label(arg)


def _env(value: str) -> str:
    found = _ASSIGN.fullmatch(value)
    if found and credential_name(found.group(1)):
        return f"{found.group(1)}={REDACTED}"
    return text_label(value)


def _header(value: str) -> str:
    found = _HEADER.fullmatch(value)
    if found and credential_name(found.group(1)):
        return found.group(1) + found.group(2) + REDACTED
    return text_label(value)
