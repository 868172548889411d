"""What a tool declares and passes is checked where it is declared (issue 12, items 6-9).

Redaction covers every form an argument takes (``**kwargs``, a dataclass or pydantic
attribute, a ``key=`` function) and a path that names nothing is refused; async callable
objects and partials are awaited; names that no store can keep, and durations that
overflow a clock or a store, are refused when the tool is declared, in one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import sys
import threading
import time
from typing import Any

import pytest

from singleflight_agents import Singleflight, Source, ToolExecutionOptions

API_KEY = "sk-live-5b7e0c9d1a2f"


def _stored(sf: Singleflight) -> str:
    return "\n".join(repr(r) for r in sf.store.iter_receipts())


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- 6. redaction: every form of an argument -------------------------------------------


def call_api(query: str, **options: Any) -> str:
    return f"answer to {query}"


@dataclasses.dataclass(frozen=True)
class Config:
    api_key: str
    model: str = "small"


def configured(query: str, cfg: Config) -> str:
    return f"{cfg.model}: {query}"


def untyped(query, cfg):  # type: ignore[no-untyped-def]
    return query


def test_a_secret_passed_through_kwargs_is_redacted(sf: Singleflight) -> None:
    options = ToolExecutionOptions(tool_name="api.call", deterministic=True, redact=["api_key"])
    outcome = sf.execute_sync(call_api, "q", api_key=API_KEY, region="eu", options=options)
    assert outcome.receipt is not None
    assert outcome.receipt.inputs == (
        '{"options":{"api_key":"[redacted]","region":"eu"},"query":"q"}')
    assert API_KEY not in _stored(sf)
    # the key still covers the real value: another credential is another call
    other = sf.execute_sync(call_api, "q", api_key="sk-other-000000", region="eu", options=options)
    assert other.source is Source.EXECUTED and other.fingerprint != outcome.fingerprint
    # a keyword the caller may leave out: a call without it is fine
    assert sf.execute_sync(call_api, "q", options=options).value == "answer to q"


def test_a_dataclass_attribute_path_is_redacted(sf: Singleflight) -> None:
    options = ToolExecutionOptions(tool_name="api.cfg", deterministic=True,
                                   redact=["cfg.api_key"])
    outcome = sf.execute_sync(configured, "q", Config(API_KEY), options=options)
    assert outcome.receipt is not None
    assert outcome.receipt.inputs == (
        '{"cfg":{"__sf__":"dataclass","c":"test_hardening_inputs.Config",'
        '"v":{"api_key":"[redacted]","model":"small"}},"query":"q"}')
    assert API_KEY not in _stored(sf)
    assert sf.execute_sync(configured, "q", Config(API_KEY), options=options).source is (
        Source.CACHE_HIT)


def test_a_pydantic_attribute_path_is_redacted(sf: Singleflight) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Settings(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        api_key: str
        temperature: float = 0.0

    def ask(query: str, settings: Any) -> str:
        return query

    options = ToolExecutionOptions(tool_name="api.pydantic", deterministic=True,
                                   redact=["settings.api_key"])
    outcome = sf.execute_sync(ask, "q", Settings(api_key=API_KEY), options=options)
    assert outcome.receipt is not None and outcome.receipt.inputs is not None
    assert '"v":{"api_key":"[redacted]","temperature":0.0}' in outcome.receipt.inputs
    assert API_KEY not in _stored(sf)

    class Client(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        api_key: str = pydantic.Field(exclude=True)  # never dumped: nothing to mask, no error
        region: str = "eu"

    options = options.replace(tool_name="api.pydantic_excluded")
    outcome = sf.execute_sync(ask, "q", Client(api_key=API_KEY), options=options)
    assert outcome.receipt is not None and '"v":{"region":"eu"}' in (outcome.receipt.inputs or "")


@pytest.mark.parametrize("key", [
    lambda query, api_key: (query, api_key),
    lambda query, api_key: f"{query}?key={api_key}",
    lambda query, api_key: {"q": query, "auth": {"token": api_key}},
], ids=["tuple", "inside-a-string", "nested"])
def test_a_key_function_result_is_redacted(sf: Singleflight, key: Any) -> None:
    def fetch(query: str, api_key: str) -> str:
        return query

    options = ToolExecutionOptions(tool_name="api.keyed", deterministic=True, key=key,
                                   redact=["api_key"])
    outcome = sf.execute_sync(fetch, "q", API_KEY, options=options)
    assert outcome.receipt is not None and "[redacted]" in (outcome.receipt.inputs or "")
    assert API_KEY not in _stored(sf)
    assert sf.execute_sync(fetch, "q", API_KEY, options=options).source is Source.CACHE_HIT


def test_a_key_function_result_is_redacted_by_attribute_path(sf: Singleflight) -> None:
    options = ToolExecutionOptions(tool_name="api.keyed_cfg", deterministic=True,
                                   key=lambda query, cfg: [query, cfg.api_key],
                                   redact=["cfg.api_key"])
    outcome = sf.execute_sync(configured, "q", Config(API_KEY), options=options)
    assert outcome.receipt is not None
    assert outcome.receipt.inputs == '["q","[redacted]"]'


def test_a_redact_path_that_names_no_argument_is_refused_when_declared(sf: Singleflight) -> None:
    def fetch(query: str, api_key: str) -> str:
        return query

    with pytest.raises(ValueError) as info:
        sf.tool(tool_name="api.fetch", deterministic=True, redact=["apikey"])(fetch)
    assert _one_line(info) == (
        "api.fetch: redact path 'apikey' names no argument of the tool (it takes: query, "
        "api_key); name an argument, or a dotted path into one")


def test_a_redact_path_that_names_no_field_of_an_annotated_record_is_refused() -> None:
    from singleflight_agents.fingerprint import check_redact

    with pytest.raises(ValueError) as info:
        check_redact(configured, ["cfg.apikey"], "api.cfg")
    assert _one_line(info) == (
        "api.cfg: redact path 'cfg.apikey' names no field of Config (at 'apikey'; it has: "
        "api_key, model); fix the path, or the tool would store its value")
    check_redact(configured, ["cfg.api_key", "query"], "api.cfg")  # these are fine
    check_redact(call_api, ["api_key"], "api.call")  # a keyword **options may receive


def test_a_bad_redact_path_raises_at_the_first_call_before_the_tool_runs(
        sf: Singleflight) -> None:
    runs: list[str] = []

    def fetch(query: str, api_key: str) -> str:
        runs.append(query)
        return query

    options = ToolExecutionOptions(tool_name="api.fetch2", deterministic=True,
                                   redact=["token"])
    with pytest.raises(ValueError, match="redact path 'token' names no argument"):
        sf.execute_sync(fetch, "q", API_KEY, options=options)
    # unannotated: known only once a record arrives without the field
    options = ToolExecutionOptions(tool_name="api.untyped", deterministic=True,
                                   redact=["cfg.apikey"])
    with pytest.raises(ValueError) as info:
        sf.execute_sync(untyped, "q", Config(API_KEY), options=options)
    assert _one_line(info) == (
        "api.untyped: redact path 'cfg.apikey' names no field of Config (at 'apikey'); fix "
        "the path, or the tool would store its value")
    assert runs == [] and API_KEY not in _stored(sf)


def test_a_redact_path_with_an_empty_part_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        ToolExecutionOptions(redact=["headers..Authorization"])
    assert _one_line(info) == (
        "ToolExecutionOptions.redact: path 'headers..Authorization' has an empty part; join "
        "names with single dots, as in 'headers.Authorization'")


# -- 7. async callable objects and partials are awaited ----------------------------------


class AsyncSearch:
    """A callable object whose __call__ is a coroutine function."""

    def __init__(self, index: str) -> None:
        self.index = index
        self.runs = 0

    async def __call__(self, query: str) -> str:
        self.runs += 1
        await asyncio.sleep(0)
        return f"{self.index}:{query}"


async def join(prefix: str, query: str) -> str:
    return f"{prefix}:{query}"


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
async def test_an_async_callable_object_is_awaited(sf: Singleflight, shared: bool) -> None:
    tool = AsyncSearch("docs")
    options = ToolExecutionOptions(tool_name="search.obj", deterministic=shared)
    first = await sf.execute(tool, "q", options=options)
    again = await sf.execute(tool, "q", options=options)
    assert (first.value, again.value) == ("docs:q", "docs:q")
    assert again.source is (Source.CACHE_HIT if shared else Source.EXECUTED_UNSHARED)
    assert sf.execute_sync(tool, "r", options=options).value == "docs:r"


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
async def test_a_partial_of_an_async_callable_is_awaited(sf: Singleflight, shared: bool) -> None:
    tools = {"of-a-function": functools.partial(join, "p"),
             "of-an-object": functools.partial(AsyncSearch("p")),
             "of-a-partial": functools.partial(functools.partial(join), "p")}
    for name, tool in tools.items():
        options = ToolExecutionOptions(tool_name=f"search.partial-{name}", deterministic=shared)
        assert (await sf.execute(tool, "q", options=options)).value == "p:q", name
        assert sf.execute_sync(tool, "r", options=options).value == "p:r", name


async def test_a_decorated_async_callable_object_is_a_coroutine_function(
        sf: Singleflight) -> None:
    tool = sf.tool(tool_name="search.decorated", deterministic=True)(AsyncSearch("d"))
    assert asyncio.iscoroutinefunction(tool)
    assert await tool("q") == "d:q"


# -- 8. names and scopes that no store can keep ------------------------------------------


@pytest.mark.parametrize("field", ["tool_name", "scope", "namespace", "version"])
def test_a_lone_surrogate_in_a_name_is_refused_when_declared(sf: Singleflight,
                                                              field: str) -> None:
    runs: list[str] = []

    def tool(x: str) -> str:
        runs.append(x)
        return x

    with pytest.raises(ValueError) as info:
        sf.tool(deterministic=True, **{"tool_name": "ok.tool", field: "bad\udcff"})(tool)
    assert _one_line(info) == (
        f"ToolExecutionOptions.{field} 'bad\\udcff' holds the lone surrogate '\\udcff' at "
        f"index 3, which UTF-8 cannot encode; pass plain text")
    # nothing ran, nothing is poisoned: other tools and close() still work
    assert sf.execute_sync(tool, "x", options=ToolExecutionOptions(
        tool_name="ok.tool", deterministic=True)).value == "x"
    sf.flush_stats()
    sf.close()
    assert runs == ["x"]


def test_a_default_tool_name_with_a_surrogate_is_refused(sf: Singleflight) -> None:
    def tool(x: str) -> str:
        return x

    tool.__qualname__ = "tool\udcff"
    with pytest.raises(ValueError) as info:
        sf.tool(deterministic=True)(tool)
    assert _one_line(info) == (
        "the tool name made of the function's module and name 'test_hardening_inputs.tool"
        "\\udcff' holds the lone surrogate '\\udcff' at index 26, which UTF-8 cannot encode; "
        "pass tool_name= with plain text")


# -- 9. durations and costs: bounded where they are declared -------------------------------


TEN_YEARS, DAY = 315_360_000, 86_400


@pytest.mark.parametrize(("field", "value", "bounds"), [
    ("wait_timeout_seconds", 1e10, "a positive number of seconds, at most 315360000 (10 years)"),
    ("ttl_seconds", 1e306, "a positive number of seconds, at most 315360000 (10 years)"),
    ("ttl_seconds", 10**400, "a positive number of seconds, at most 315360000 (10 years)"),
    ("lease_seconds", 1e306, "a positive number of seconds, from 0.1 to 86400 (a day)"),
    ("lease_seconds", 0.001, "a positive number of seconds, from 0.1 to 86400 (a day)"),
    ("ttl_seconds", True, "a positive number of seconds, at most 315360000 (10 years)"),
    ("estimated_cost_usd", 1e308, "a number of dollars from 0 to 1000000"),
    ("estimated_cost_usd", float("nan"), "a number of dollars from 0 to 1000000"),
], ids=["wait-1e10", "ttl-1e306", "ttl-huge-int", "lease-1e306", "lease-1ms", "ttl-bool",
        "cost-1e308", "cost-nan"])
def test_out_of_range_numbers_are_refused_when_declared(field: str, value: Any,
                                                        bounds: str) -> None:
    with pytest.raises(ValueError) as info:
        ToolExecutionOptions(**{field: value})
    assert _one_line(info) == f"ToolExecutionOptions.{field} must be {bounds}, got {value!r}"


def test_the_largest_durations_work_on_every_store(sf: Singleflight) -> None:
    """Just past the bounds is refused; at them nothing overflows, not a Redis expiry in
    milliseconds, not a thread's wait, not the lease's renewal: a waiter waits, is served."""
    assert threading.TIMEOUT_MAX > TEN_YEARS  # every thread wait is at most wait_timeout
    for field, above in [("ttl_seconds", TEN_YEARS + 1), ("lease_seconds", DAY + 1),
                         ("wait_timeout_seconds", TEN_YEARS + 1), ("estimated_cost_usd", 1e6 + 1)]:
        with pytest.raises(ValueError, match=f"{field} must be"):
            ToolExecutionOptions(**{field: above})
    options = ToolExecutionOptions(tool_name="slow.max", deterministic=True,
                                   ttl_seconds=TEN_YEARS, lease_seconds=DAY,
                                   wait_timeout_seconds=TEN_YEARS, estimated_cost_usd=1e6)
    entered, release = threading.Event(), threading.Event()

    def slow(x: int) -> int:
        entered.set()
        assert release.wait(10)
        return x

    got: list[Any] = []
    owner = threading.Thread(target=lambda: got.append(sf.execute_sync(slow, 1, options=options)))
    owner.start()
    assert entered.wait(10)
    waiter = threading.Thread(target=lambda: got.append(sf.execute_sync(slow, 1, options=options)))
    waiter.start()
    _until(lambda: _blocked_in_a_wait(waiter))
    release.set()
    owner.join(10)
    waiter.join(10)
    assert sorted(o.source for o in got) == [Source.EXECUTED, Source.SHARED_WAIT]
    receipt = got[0].receipt or got[1].receipt
    assert receipt is not None
    assert receipt.expires_at - receipt.created_at == pytest.approx(TEN_YEARS)
    assert sf.execute_sync(slow, 1, options=options).source is Source.CACHE_HIT
    sf.flush_stats()
    assert sf.summary()["dollars_saved"] == 2e6


async def test_an_async_waiter_with_the_largest_wait_timeout_is_served(sf: Singleflight) -> None:
    with pytest.raises(ValueError, match="wait_timeout_seconds must be"):
        ToolExecutionOptions(wait_timeout_seconds=TEN_YEARS * 1.01)
    options = ToolExecutionOptions(tool_name="slow.async", deterministic=True,
                                   wait_timeout_seconds=TEN_YEARS, lease_seconds=DAY)
    release = asyncio.Event()

    async def slow(x: int) -> int:
        await release.wait()
        return x

    owner = asyncio.create_task(sf.execute(slow, 1, options=options))
    await asyncio.sleep(0)  # the owner's first step: it runs the tool, which waits
    waiter = asyncio.create_task(sf.execute(slow, 1, options=options))
    await asyncio.sleep(0)  # the waiter's first step: it waits on the owner's flight
    release.set()
    outcomes = await asyncio.gather(owner, waiter)
    # An async call's first look may run in a store thread: either may own the flight.
    assert sorted(o.source for o in outcomes) == [Source.EXECUTED, Source.SHARED_WAIT]


def _blocked_in_a_wait(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name in ("wait", "result", "_wait_for_tstate_lock"):
            return True
        frame = frame.f_back
    return False


def _until(predicate: Any, timeout: float = 10.0) -> None:
    """Polls state the test can see (a thread's frames), not a guess at how long it takes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


@dataclasses.dataclass
class _Token:
    token: str


def _annotated(items: list[_Token]) -> int:
    return len(items)


def _plain(items: Any) -> int:
    return len(items)


def test_a_redact_path_through_a_list_must_name_the_item() -> None:
    from singleflight_agents import Singleflight

    sf = Singleflight(store="unused.db")
    with pytest.raises(ValueError, match=r"redact path 'items\.token' meets a list at 'token', "
                                         r"which is not an index; name the item \(e\.g\. "
                                         r"'items\.0\.token'\) or redact the whole 'items'"):
        sf.tool(tool_name="t.a", deterministic=True, redact=("items.token",))(_annotated)
    tool = sf.tool(tool_name="t.p", deterministic=True, redact=("items.token",))(_plain)
    with pytest.raises(ValueError, match="meets a list at 'token'"):
        tool([_Token("sk-SECRET")])  # refused before the tool runs: nothing stored
    assert not __import__("pathlib").Path("unused.db").exists()
