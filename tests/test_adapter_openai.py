"""The OpenAI Agents SDK adapter against the real SDK (``agents``), offline via ScriptedModel."""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from typing import Annotated, Any

import pytest
from agents import Agent, FunctionTool, RunConfig, RunContextWrapper, Runner
from agents import function_tool as sdk_function_tool
from agents.items import ToolCallOutputItem
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tool_context import ToolContext
from conftest import SECRET
from pydantic import BaseModel

from singleflight_agents import Session, Singleflight, adapters, make_fingerprint
from singleflight_agents.adapters import function_tool, wrap_function_tool

CONFIG = RunConfig(tracing_disabled=True)


class Address(BaseModel):
    city: str


def f_google(city: str, units: str = "metric") -> str:
    """Get the weather for a city.

    Args:
        city: The city to look up.
        units: metric or imperial.
    """
    return f"{city}:{units}"


async def f_annotated(query: Annotated[str, "What to find"], limit: int = 5,
                      tags: list[str] | None = None) -> list[str]:
    return [query] * limit  # no docstring


def f_context(ctx: RunContextWrapper[Any], order_id: int) -> str:
    """Look up an order.

    :param order_id: The order number.
    """
    return str(order_id)


async def f_tool_context(ctx: ToolContext[Any], address: Address, *, verbose: bool = False) -> str:
    """Geocode an address.

    Args:
        address: Where.
    """
    return address.city


SIGNATURES = [
    (f_google, {}), (f_google, {"name_override": "weather", "description_override": "Now."}),
    (f_annotated, {}), (f_annotated, {"strict_mode": False}),
    (f_context, {"docstring_style": "sphinx"}), (f_context, {"use_docstring_info": False}),
    (f_tool_context, {}), (f_tool_context, {"strict_mode": False, "is_enabled": False}),
]


@pytest.mark.parametrize(("func", "sdk_options"), SIGNATURES)
def test_the_tool_is_the_one_agents_function_tool_builds(
        sqlite_sf: Singleflight, func: Any, sdk_options: dict[str, Any]) -> None:
    expected = sdk_function_tool(func, **sdk_options)
    for got in (function_tool(sqlite_sf, func, deterministic=True, **sdk_options),
                function_tool(sqlite_sf, bounded_read=True, ttl_seconds=60, **sdk_options)(func)):
        assert isinstance(got, FunctionTool)
        for field in ("name", "description", "params_json_schema", "strict_json_schema",
                      "is_enabled"):
            assert getattr(got, field) == getattr(expected, field), field


def _run(tool: FunctionTool, steps: list[Any], context: Any = None) -> Any:
    agent = Agent(name="agent", model=ScriptedModel(steps), tools=[tool])
    return Runner.run(agent, "go", context=context, run_config=CONFIG)


def _outputs(result: Any) -> list[str]:
    return [str(item.output) for item in result.new_items if isinstance(item, ToolCallOutputItem)]


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
async def test_two_identical_calls_in_one_turn_execute_once(sf: Singleflight, is_async: bool) -> None:
    runs: list[str] = []

    if is_async:
        async def search(query: str) -> str:
            runs.append(query)
            await asyncio.sleep(0.2)
            return f"found {query}"
    else:
        def search(query: str) -> str:  # the SDK runs it in a worker thread
            runs.append(query)
            time.sleep(0.2)
            return f"found {query}"

    tool = function_tool(sf, search, tool_name="search", deterministic=True,
                         estimated_cost_usd=0.5)
    result = await _run(tool, [
        [function_call("search", {"query": "refunds"}, call_id="c1"),
         function_call("search", '{ "query" : "refunds" }', call_id="c2")],
        [function_call("search", {"query": "refunds"}, call_id="c3")],  # the next turn
        [assistant_message("done")],
    ])
    assert (result.final_output, runs, _outputs(result)) == ("done", ["refunds"], ["found refunds"] * 3)
    stats = sf.summary()["tools"]["search"]
    assert (stats["calls"], stats["executed"], stats["shared_waits"], stats["cache_hits"]) == (3, 1, 1, 1)
    assert stats["dollars_saved"] == pytest.approx(1.0)


async def test_the_context_reaches_the_function_but_not_the_key(sqlite_sf: Singleflight) -> None:
    seen: list[Any] = []
    keyed: list[tuple[Any, ...]] = []

    async def lookup(ctx: RunContextWrapper[dict[str, str]], order_id: int, full: bool = False) -> str:
        seen.append(ctx.context["user"])
        return f"order {order_id}"

    tool = function_tool(sqlite_sf, lookup, tool_name="lookup", deterministic=True, scope="s")
    steps = [[function_call("lookup", {"order_id": 7, "full": False}, call_id="c")], [assistant_message("")]]
    first = await _run(tool, steps, context={"user": "ada"})
    second = await _run(tool, steps, context={"user": "grace"})
    assert _outputs(first) == _outputs(second) == ["order 7"]
    assert seen == ["ada"]  # the second run, another context, was served the receipt
    receipt = sqlite_sf.store.get(make_fingerprint("lookup", {"order_id": 7, "full": False}, scope="s"))
    assert receipt is not None and receipt.inputs == '{"full":false,"order_id":7}'

    def key(order_id: int, full: bool = False) -> int:
        keyed.append((order_id, full))
        return order_id

    keyed_tool = function_tool(sqlite_sf, lookup, deterministic=True, key=key, tool_name="lk")
    await _run(keyed_tool, steps, context={"user": "alan"})
    assert keyed == [(7, False)]  # key= is called without the context


async def test_a_failure_reaches_the_model_and_is_not_stored(sqlite_sf: Singleflight) -> None:
    runs = 0

    def flaky(n: int) -> int:
        nonlocal runs
        runs += 1
        raise ValueError("backend down")

    tool = function_tool(sqlite_sf, flaky, tool_name="flaky", deterministic=True)
    for _ in range(2):
        result = await _run(tool, [[function_call("flaky", {"n": 1}, call_id="c")], [assistant_message("")]])
        assert "error occurred" in _outputs(result)[0]
    assert runs == 2
    assert sqlite_sf.summary()["tools"]["flaky"]["failures"] == 2


async def test_wrap_function_tool_keys_on_canonical_json(sqlite_sf: Singleflight) -> None:
    runs: list[str] = []

    @sdk_function_tool(name_override="kb_search")  # as a library would hand it over
    async def original(ctx: ToolContext[Any], query: str, top_k: int = 3) -> str:
        """Search the knowledge base.

        Args:
            query: Words to find.
        """
        runs.append(ctx.tool_call_id)
        await asyncio.sleep(0.1)
        return f"{query}/{top_k}"

    tool = wrap_function_tool(sqlite_sf, original, bounded_read=True, ttl_seconds=60)
    assert (tool.name, tool.description, tool.params_json_schema) == (
        original.name, original.description, original.params_json_schema)
    assert tool.__wrapped__ is original.__wrapped__
    result = await _run(tool, [
        [function_call("kb_search", '{"query":"tax","top_k":3}', call_id="c1"),
         function_call("kb_search", '{ "top_k": 3,\n "query": "tax" }', call_id="c2")],
        [function_call("kb_search", {"top_k": 3, "query": "tax"}, call_id="c3"),
         function_call("kb_search", {"query": "tax", "top_k": 4}, call_id="c4")],
        [assistant_message("done")],
    ])
    assert _outputs(result) == ["tax/3", "tax/3", "tax/3", "tax/4"]
    assert runs == ["c1", "c4"]  # the ToolContext (its call id) is not keyed
    stats = sqlite_sf.summary()["tools"]["openai.tool.kb_search"]
    assert (stats["calls"], stats["executed"]) == (4, 2)
    assert sqlite_sf.store.get(make_fingerprint("openai.tool.kb_search", {"query": "tax", "top_k": 4}))


async def test_wrap_function_tool_on_a_hand_built_tool_and_its_errors(sqlite_sf: Singleflight) -> None:
    runs: list[str] = []

    async def invoke(ctx: ToolContext[Any], arguments: str) -> str:
        runs.append(arguments)
        return arguments.upper() if "boom" not in arguments else 1 / 0  # type: ignore[return-value]

    plain = FunctionTool(name="echo", description="Echo.", on_invoke_tool=invoke,
                         params_json_schema={"type": "object", "properties": {}})
    tool = wrap_function_tool(sqlite_sf, plain, deterministic=True)

    def call(arguments: str) -> Any:  # as the runner calls it
        context = ToolContext(None, tool_name="echo", tool_call_id="x", tool_arguments=arguments)
        return tool.on_invoke_tool(context, arguments)

    assert await call('{"a": 1, "b": 2}') == await call('{"b":2,"a":1}') == '{"A": 1, "B": 2}'
    assert runs == ['{"a": 1, "b": 2}']
    for _ in range(2):  # a hand-built invoker's errors propagate, as without the wrapper
        with pytest.raises(ZeroDivisionError):
            await call('{"boom": 1}')
    assert await call("not json") == "NOT JSON"  # not a JSON object: run, unshared
    assert len(runs) == 4


def test_unknown_keywords_are_named(sqlite_sf: Singleflight) -> None:
    with pytest.raises(TypeError, match=r"colour, sizes.*name_override.*ttl_seconds"):
        function_tool(sqlite_sf, f_google, colour="red", sizes=3)
    with pytest.raises(TypeError, match="colour"):
        function_tool(sqlite_sf, colour="red")
    with pytest.raises(TypeError, match="name_override"):
        wrap_function_tool(sqlite_sf, sdk_function_tool(f_google), name_override="x")
    with pytest.raises(TypeError, match="FunctionTool"):
        wrap_function_tool(sqlite_sf, f_google)  # type: ignore[arg-type]


async def test_an_unflagged_tool_runs_every_call_unshared_and_stores_nothing(
        sf: Singleflight, store_url: str) -> None:
    # One policy everywhere: a tool without a flag is accepted and never shared.
    runs: list[str] = []

    def search(query: str) -> str:
        runs.append(query)
        return f"found {query}"

    steps = [[function_call("search", {"query": "q"}, call_id="c1"),
              function_call("search", {"query": "q"}, call_id="c2")], [assistant_message("done")]]
    plain = function_tool(sf, search, tool_name="search")
    wrapped = wrap_function_tool(sf, sdk_function_tool(search, name_override="search"))
    with Session(store_url, secret=SECRET) as run, run.scope("unflagged") as scope:
        for tool in (plain, wrapped):
            assert _outputs(await _run(tool, steps)) == ["found q"] * 2
        assert list(run.engine.store.iter_receipts()) == []
    assert runs == ["q"] * 4
    assert [str(o.source) for o in scope.outcomes] == ["executed_unshared"] * 4
    assert all(o.receipt is None for o in scope.outcomes)


def test_mode_is_not_an_option_of_wrap_function_tool(sqlite_sf: Singleflight) -> None:
    tool = sdk_function_tool(f_google)
    with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
        wrap_function_tool(sqlite_sf, tool, bounded_read=True, mode="replay")
    with pytest.raises(TypeError, match=r"record_command= .* belongs to the run"):
        wrap_function_tool(sqlite_sf, tool, bounded_read=True, record_command="make record")


def test_mode_is_not_an_option_of_function_tool(sqlite_sf: Singleflight) -> None:
    with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
        function_tool(sqlite_sf, f_google, bounded_read=True, mode="replay")


async def test_function_tool_takes_the_option_aliases(sqlite_sf: Singleflight) -> None:
    tool = function_tool(sqlite_sf, f_google, bounded_read=True, ttl=60, cost=0.5)
    await _run(tool, [[function_call("f_google", {"city": "Oslo"}, call_id="c")],
                      [assistant_message("")]])
    [receipt] = list(sqlite_sf.store.iter_receipts())
    assert receipt.expires_at - receipt.created_at == pytest.approx(60)
    assert receipt.cost_usd == 0.5


def test_a_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in {"agents", *(n for n in sys.modules if n.startswith("agents."))}:
        monkeypatch.setitem(sys.modules, name, None)  # "import agents..." now fails
    monkeypatch.delitem(sys.modules, "singleflight_agents.adapters.openai_agents", raising=False)
    for name in ("function_tool", "wrap_function_tool"):
        monkeypatch.delattr(adapters, name, raising=False)  # the package caches loaded names
    with pytest.raises(ImportError) as raised:
        importlib.import_module("singleflight_agents.adapters.openai_agents")
    assert raised.value.name == "agents"
    with pytest.raises(ImportError, match=r"pip install 'singleflight-agents\[openai\]'"):
        adapters.wrap_function_tool  # noqa: B018


@pytest.mark.slow
async def test_the_demo_runs_offline(sqlite_sf: Singleflight) -> None:
    from singleflight_agents.demo_openai import run_openai_demo

    lines: list[str] = []
    result = await run_openai_demo(sqlite_sf, emit=lines.append)
    assert (result["calls"], result["baseline_executions"], result["executions"]) == (7, 7, 3)
    summary = result["summary"]
    assert (summary["calls"], summary["unique_executions"], summary["avoided_calls"]) == (7, 3, 4)
    assert "7 executions" in lines[1] and "3 executions" in lines[2]


def test_closures_and_same_named_tools_of_two_modules_never_share(sqlite_sf: Singleflight) -> None:
    def make_search(index: str):  # type: ignore[no-untyped-def]
        def search(query: str) -> str:
            """Search."""
            return f"{index}:{query}"
        return search

    with pytest.raises(TypeError, match="tool_name="):
        function_tool(sqlite_sf, make_search("docs"), deterministic=True)
    plain = function_tool(sqlite_sf, f_google, deterministic=True)
    assert plain.name == "f_google"  # what the model sees is unchanged
