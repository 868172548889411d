"""The PydanticAI adapter against the real ``pydantic_ai``, offline: ``TestModel`` and scripted
``FunctionModel`` agents, no network, no API key. Every test that runs tools does so on each
store (the ``sf`` fixture: SQLite, then Redis)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest

pytest.importorskip("pydantic_ai")

from conftest import SECRET
from pydantic import BaseModel, Field
from pydantic_ai import Agent, ModelRetry, RunContext, Tool
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.toolsets import DynamicToolset, FunctionToolset

from singleflight_agents import ReplayMissError, Session, Singleflight, adapters, make_fingerprint, session
from singleflight_agents.adapters import pydantic_ai_tool, wrap_pydantic_ai_toolset

ROOT = Path(__file__).resolve().parent.parent
RUNS: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_runs() -> None:
    RUNS.clear()


# -- helpers -----------------------------------------------------------------------------------


Turn = Sequence[ToolCallPart] | str


def scripted(turns: Sequence[Turn]) -> FunctionModel:
    """A model that answers its n-th request with ``turns[n]``: tool calls, or the final text."""
    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        turn = turns[len(messages) // 2]  # request, response, request, ...
        parts = [TextPart(turn)] if isinstance(turn, str) else list(turn)
        return ModelResponse(parts=parts)

    return FunctionModel(respond, model_name="scripted")


def call(tool: str, args: dict[str, Any] | str, call_id: str) -> ToolCallPart:
    return ToolCallPart(tool, args, tool_call_id=call_id)


def returns(result: Any) -> list[Any]:
    """What each tool call returned to the model, in order."""
    return [part.content for message in result.all_messages() for part in message.parts
            if isinstance(part, ToolReturnPart)]


def stats(sf: Singleflight, tool_name: str) -> tuple[int, int, int, int]:
    tool = sf.summary()["tools"][tool_name]
    return tool["calls"], tool["executed"], tool["shared_waits"], tool["cache_hits"]


# -- the tool the model sees is PydanticAI's own -----------------------------------------------


@dataclass
class Deps:
    user: str


class Address(BaseModel):
    """Where to look."""

    city: str
    country: str = "NO"


def f_google(ctx: RunContext[Deps], city: str, units: Literal["metric", "imperial"] = "metric") -> str:
    """Get the weather for a city.

    Args:
        city: The city to look up.
        units: metric or imperial.
    """
    return f"{city}:{units}"


async def f_annotated(query: Annotated[str, Field(description="What to find")], limit: int = 5,
                      tags: list[str] | None = None) -> list[str]:
    return [query] * limit  # no docstring


async def f_model(ctx: RunContext[Deps], address: Address) -> dict[str, str]:
    """Geocode an address.

    :param address: Where.
    """
    return {"city": address.city}


def f_numpy(x: float, /, scale: float = 1.0, *, verbose: bool = False) -> float:
    """Scale a number.

    Parameters
    ----------
    x
        The number.
    scale
        By how much.
    """
    return x * scale


Register = Callable[[TestModel, Any], Agent[Deps, str]]


def _agent_tool(model: TestModel, func: Any) -> Agent[Deps, str]:
    agent = Agent(model, deps_type=Deps)
    agent.tool(func)
    return agent


def _agent_tool_options(model: TestModel, func: Any) -> Agent[Deps, str]:
    agent = Agent(model, deps_type=Deps)
    agent.tool(name="renamed", description="Other words.", retries=3, docstring_format="sphinx",
               strict=True)(func)
    return agent


def _tool_plain(model: TestModel, func: Any) -> Agent[Deps, str]:
    agent = Agent(model, deps_type=Deps)
    agent.tool_plain(func)
    return agent


def _tool_object(model: TestModel, func: Any) -> Agent[Deps, str]:
    return Agent(model, deps_type=Deps, tools=[Tool(func)])


def _toolset(model: TestModel, func: Any) -> Agent[Deps, str]:
    return Agent(model, deps_type=Deps, toolsets=[FunctionToolset([func])])


REGISTRATIONS = [
    (f_google, _agent_tool), (f_google, _agent_tool_options), (f_google, _tool_object),
    (f_model, _agent_tool), (f_model, _toolset),
    (f_annotated, _tool_plain), (f_annotated, _tool_object),
    (f_numpy, _tool_plain), (f_numpy, _toolset),
]


def _definitions(func: Any, register: Register) -> list[Any]:
    model = TestModel(call_tools=[])
    register(model, func).run_sync("hi", deps=Deps("ada"))
    assert model.last_model_request_parameters is not None
    return model.last_model_request_parameters.function_tools


@pytest.mark.parametrize(("func", "register"), REGISTRATIONS,
                         ids=[f"{f.__name__}-{r.__name__.strip('_')}" for f, r in REGISTRATIONS])
def test_the_schema_the_model_sees_is_identical(
        sf: Singleflight, func: Any, register: Register) -> None:
    wrapped = pydantic_ai_tool(sf, func, deterministic=True)
    assert _definitions(wrapped, register) == _definitions(func, register)
    plain, ours = Tool(func), Tool(wrapped)
    for attribute in ("name", "description", "takes_ctx"):
        assert getattr(ours, attribute) == getattr(plain, attribute), attribute
    for attribute in ("json_schema", "return_schema", "is_async", "single_arg_name",
                      "positional_fields", "var_positional_field"):
        assert getattr(ours.function_schema, attribute) == getattr(plain.function_schema, attribute)
    assert ours.tool_def == plain.tool_def


def test_a_wrapped_toolset_lists_the_same_tools(sf: Singleflight) -> None:
    def definitions(toolset: Any) -> Any:
        model = TestModel(call_tools=[])
        Agent(model, deps_type=Deps, toolsets=[toolset]).run_sync("hi", deps=Deps("ada"))
        assert model.last_model_request_parameters is not None
        return model.last_model_request_parameters.function_tools

    tools = [Tool(f_google), Tool(f_model), Tool(f_numpy, name="scale", strict=True)]
    assert definitions(wrap_pydantic_ai_toolset(sf, FunctionToolset(tools), bounded_read=True)) \
        == definitions(FunctionToolset(tools))


# -- identical calls execute once --------------------------------------------------------------


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
async def test_identical_calls_in_one_run_and_across_runs_execute_once(
        sf: Singleflight, is_async: bool) -> None:
    agent = Agent(scripted([
        [call("search", {"query": "refunds"}, "c1"),
         call("search", '{ "limit" : 3, "query" : "refunds" }', "c2")],  # the default, given
        [call("search", {"query": "refunds"}, "c3")],                    # the next turn
        "done",
    ]), deps_type=Deps)

    if is_async:
        @agent.tool
        @pydantic_ai_tool(sf, tool_name="search", deterministic=True, estimated_cost_usd=0.5)
        async def search(ctx: RunContext[Deps], query: str, limit: int = 3) -> str:
            RUNS[query] += 1
            await asyncio.sleep(0.2)
            return f"found {query}"
    else:
        @agent.tool
        @pydantic_ai_tool(sf, tool_name="search", deterministic=True, estimated_cost_usd=0.5)
        def search(ctx: RunContext[Deps], query: str, limit: int = 3) -> str:  # in a worker thread
            RUNS[query] += 1
            time.sleep(0.2)
            return f"found {query}"

    first = await agent.run("go", deps=Deps("ada"))
    assert (first.output, returns(first), RUNS) == ("done", ["found refunds"] * 3, {"refunds": 1})
    assert stats(sf, "search") == (3, 1, 1, 1)
    second = await agent.run("go", deps=Deps("ada"))  # another run: served from the receipt
    assert returns(second) == ["found refunds"] * 3 and RUNS == {"refunds": 1}
    assert stats(sf, "search") == (6, 1, 1, 4)
    assert sf.summary()["tools"]["search"]["dollars_saved"] == pytest.approx(2.5)
    assert asyncio.iscoroutinefunction(search) is is_async  # sync stays sync


def t_lookup(ctx: RunContext[Deps], account: str) -> str:
    """Look up an account."""
    RUNS["lookup"] += 1
    return f"account {account}"


async def t_quote(symbol: str, exchange: str = "XOSL") -> float:
    """Quote a share."""
    RUNS["quote"] += 1
    return 42.0


async def test_test_model_runs_call_every_tool_once_across_runs(sf: Singleflight) -> None:
    # TestModel calls every tool with the same generated arguments in every run.
    agent = Agent(TestModel(), deps_type=Deps)
    agent.tool(pydantic_ai_tool(sf, t_lookup, bounded_read=True))
    agent.tool_plain(pydantic_ai_tool(sf, t_quote, deterministic=True))
    outputs = [(await agent.run("go", deps=Deps(user))).output for user in ("ada", "grace", "alan")]
    assert outputs[0] == outputs[1] == outputs[2]
    assert RUNS == {"lookup": 1, "quote": 1}
    assert stats(sf, f"{__name__}.t_lookup") == (3, 1, 0, 2)  # the default name: module.qualname
    assert stats(sf, f"{__name__}.t_quote") == (3, 1, 0, 2)


# -- the RunContext is not keyed ---------------------------------------------------------------


async def test_the_run_context_reaches_the_tool_but_not_the_key(sf: Singleflight) -> None:
    seen: list[str] = []

    async def lookup(ctx: RunContext[Deps], order_id: int, full: bool = False) -> str:
        seen.append(ctx.deps.user)
        return f"order {order_id}"

    def run(tool: Any, user: str) -> Any:
        agent = Agent(scripted([[call("lookup", {"order_id": 7}, "c")], "done"]), deps_type=Deps)
        agent.tool(tool)
        return agent.run("go", deps=Deps(user))

    tool = pydantic_ai_tool(sf, lookup, tool_name="lookup", deterministic=True, scope="s")
    assert returns(await run(tool, "ada")) == returns(await run(tool, "grace")) == ["order 7"]
    assert seen == ["ada"]  # grace's run, other deps, was served ada's receipt
    receipt = sf.store.get(make_fingerprint("lookup", {"order_id": 7, "full": False}, scope="s"))
    assert receipt is not None and receipt.inputs == '{"full":false,"order_id":7}'

    keyed: list[tuple[Any, ...]] = []

    def key(order_id: int, full: bool = False) -> int:  # called without the context
        keyed.append((order_id, full))
        return order_id

    await run(pydantic_ai_tool(sf, lookup, tool_name="lk", deterministic=True, key=key), "alan")
    assert keyed == [(7, False)]

    def per_user(ctx: RunContext[Deps], order_id: int, full: bool = False) -> list[Any]:
        return [ctx.deps.user, order_id]  # a key= that takes the RunContext gets it

    seen.clear()
    per_user_tool = pydantic_ai_tool(sf, lookup, tool_name="per-user", deterministic=True,
                                     key=per_user)
    for user in ("ada", "grace", "ada"):
        assert returns(await run(per_user_tool, user)) == ["order 7"]
    assert seen == ["ada", "grace"]  # one execution per user


async def test_a_key_that_takes_the_context_needs_a_tool_that_gets_it(sf: Singleflight) -> None:
    def by_user(ctx: RunContext[Deps], symbol: str, exchange: str = "XOSL") -> Any:
        return [ctx.deps.user, symbol]

    agent = Agent(scripted([[call("t_quote", {"symbol": "EQNR"}, "c")], "done"]), deps_type=Deps)
    agent.tool_plain(pydantic_ai_tool(sf, t_quote, deterministic=True, key=by_user))
    with pytest.raises(TypeError, match=r"by_user takes a RunContext.*tool_plain"):
        await agent.run("go", deps=Deps("ada"))
    assert RUNS == {}


# -- concurrent runs share one execution in flight ---------------------------------------------


async def test_concurrent_runs_share_one_execution_in_flight(sf: Singleflight) -> None:
    @pydantic_ai_tool(sf, tool_name="fetch", bounded_read=True)
    async def fetch(ctx: RunContext[Deps], url: str) -> str:
        RUNS[url] += 1
        await asyncio.sleep(0.3)
        return url.upper()

    def agent() -> Agent[Deps, str]:
        a = Agent(scripted([[call("fetch", {"url": "https://x"}, "c")], "done"]), deps_type=Deps)
        a.tool(fetch)
        return a

    results = await asyncio.gather(*(agent().run("go", deps=Deps(f"user{i}")) for i in range(4)))
    assert [returns(r) for r in results] == [["HTTPS://X"]] * 4
    assert RUNS == {"https://x": 1}
    assert stats(sf, "fetch") == (4, 1, 3, 0)


async def test_a_wrapped_toolset_shares_in_flight_and_fills_defaults(sf: Singleflight) -> None:
    async def rates(ctx: RunContext[Deps], base: str, day: str = "today") -> dict[str, float]:
        """Exchange rates."""
        RUNS[base] += 1
        await asyncio.sleep(0.3)
        return {"EUR": 1.0, "NOK": 11.5}

    toolset = wrap_pydantic_ai_toolset(sf, FunctionToolset([Tool(rates)]), bounded_read=True,
                                       estimated_cost_usd=0.01)

    def agent(args: dict[str, Any]) -> Agent[Deps, str]:
        return Agent(scripted([[call("rates", args, "c1"), call("rates", args, "c2")], "done"]),
                     deps_type=Deps, toolsets=[toolset])

    results = await asyncio.gather(
        agent({"base": "EUR"}).run("go", deps=Deps("ada")),
        agent({"day": "today", "base": "EUR"}).run("go", deps=Deps("grace")))
    assert [returns(r) for r in results] == [[{"EUR": 1.0, "NOK": 11.5}] * 2] * 2
    assert RUNS == {"EUR": 1}
    assert stats(sf, "pydantic_ai.tool.rates") == (4, 1, 3, 0)
    receipt = sf.store.get(make_fingerprint("pydantic_ai.tool.rates", {"base": "EUR", "day": "today"}))
    assert receipt is not None  # keyed on the name and the arguments, defaults filled in


# -- tools built elsewhere: the toolset wrapper ------------------------------------------------


async def test_a_toolset_of_library_tools_keys_on_name_and_arguments(sf: Singleflight) -> None:
    def make_search(index: str) -> Tool[Any]:  # a library's factory: closures, one per index
        def search(query: str, top_k: int = 3) -> str:
            """Search an index."""
            RUNS[f"{index}:{query}"] += 1
            return f"{index}/{query}/{top_k}"
        return Tool(search, name=f"search_{index}")

    toolset = FunctionToolset([make_search("docs"), make_search("tickets")])
    wrapped = wrap_pydantic_ai_toolset(sf, toolset, deterministic=True, namespace="kb",
                                       key=lambda query, top_k: [query.lower(), top_k])
    agent = Agent(scripted([
        [call("search_docs", {"query": "Tax"}, "c1"), call("search_tickets", {"query": "tax"}, "c2")],
        [call("search_docs", {"query": "tax", "top_k": 3}, "c3"),
         call("search_docs", {"query": "tax", "top_k": 4}, "c4")],
        "done",
    ]), toolsets=[wrapped])
    result = await agent.run("go")
    assert returns(result) == ["docs/Tax/3", "tickets/tax/3", "docs/Tax/3", "docs/tax/4"]
    assert RUNS == {"docs:Tax": 1, "tickets:tax": 1, "docs:tax": 1}
    assert sf.store.get(make_fingerprint("pydantic_ai.tool.search_docs", ["tax", 4], namespace="kb"))


async def test_a_toolset_key_may_take_the_context_and_redact_names_arguments(sf: Singleflight) -> None:
    def crm(api_key: str, email: str) -> str:
        RUNS[email] += 1
        return f"customer {email}"

    def per_user(ctx: RunContext[Deps], api_key: str, email: str) -> Any:
        return {"user": ctx.deps.user, "email": email, "api_key": api_key}

    toolset = wrap_pydantic_ai_toolset(sf, FunctionToolset([crm]), bounded_read=True,
                                       key=per_user, redact=["api_key"])
    args = {"api_key": "sk-secret-123", "email": "a@b.c"}
    for user in ("ada", "grace", "ada"):
        agent = Agent(scripted([[call("crm", args, "c")], "done"]), deps_type=Deps,
                      toolsets=[toolset])
        assert returns(await agent.run("go", deps=Deps(user))) == ["customer a@b.c"]
    assert RUNS == {"a@b.c": 2}
    stored = [r.inputs or "" for r in sf.store.iter_receipts()]
    assert len(stored) == 2 and all("sk-secret-123" not in s and "a@b.c" in s for s in stored)


async def test_a_dynamic_toolset_is_wrapped_for_every_run(sf: Singleflight) -> None:
    # A toolset built per run (and per step) from the run context: PydanticAI rebuilds the wrapper
    # around each new one (dataclasses.replace), which keeps the engine and the options.
    def make(ctx: RunContext[Deps]) -> FunctionToolset[Deps]:
        RUNS["built"] += 1
        return FunctionToolset([forecast])

    toolset = wrap_pydantic_ai_toolset(sf, DynamicToolset(make), bounded_read=True)
    for user in ("ada", "grace"):
        agent = Agent(scripted([[call("forecast", {"city": "Oslo"}, "c")], "done"]),
                      deps_type=Deps, toolsets=[toolset])
        assert returns(await agent.run("go", deps=Deps(user))) == ["3 sunny days in Oslo"]
    assert RUNS["forecast Oslo"] == 1 and RUNS["built"] >= 2
    assert stats(sf, "pydantic_ai.tool.forecast") == (2, 1, 0, 1)


def test_the_toolset_wrapper_refuses_what_it_cannot_honour(sf: Singleflight) -> None:
    toolset = FunctionToolset([t_quote])
    with pytest.raises(TypeError, match=r"no tool_name=.*pydantic_ai\.tool\.<name>.*namespace="):
        wrap_pydantic_ai_toolset(sf, toolset, tool_name="quote", deterministic=True)
    with pytest.raises(TypeError, match="AbstractToolset"):
        wrap_pydantic_ai_toolset(sf, [Tool(t_quote)], deterministic=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="colour"):
        wrap_pydantic_ai_toolset(sf, toolset, colour="red")
    with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
        wrap_pydantic_ai_toolset(sf, toolset, bounded_read=True, mode="replay")


def test_the_decorator_refuses_unknown_options_and_unnamed_closures(sf: Singleflight) -> None:
    with pytest.raises(TypeError, match="colour"):
        pydantic_ai_tool(sf, colour="red")
    with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
        pydantic_ai_tool(sf, t_quote, bounded_read=True, mode="replay")

    def make(index: str) -> Callable[[str], str]:
        def search(query: str) -> str:
            return f"{index}:{query}"
        return search

    with pytest.raises(TypeError, match="tool_name="):
        pydantic_ai_tool(sf, make("docs"), deterministic=True)
    assert Tool(pydantic_ai_tool(sf, make("docs"), tool_name="docs", deterministic=True)).name \
        == "search"  # what the model sees is unchanged


async def test_a_model_retry_reaches_the_model_and_is_not_stored(sf: Singleflight) -> None:
    @pydantic_ai_tool(sf, tool_name="flaky", deterministic=True)
    def flaky(n: int) -> int:
        RUNS["flaky"] += 1
        if RUNS["flaky"] == 1:
            raise ModelRetry("backend busy, try again")
        return n * 2

    agent = Agent(scripted([[call("flaky", {"n": 2}, "c1")], [call("flaky", {"n": 2}, "c2")], "done"]))
    agent.tool_plain(flaky)
    result = await agent.run("go")
    outcomes = [(p.content, p.outcome) for m in result.all_messages() for p in m.parts
                if isinstance(p, ToolReturnPart)]
    assert outcomes == [("backend busy, try again", "retried"), (4, "success")]
    assert RUNS == {"flaky": 2}  # the retry was not stored: the second call ran
    flaky_stats = sf.summary()["tools"]["flaky"]
    assert (flaky_stats["calls"], flaky_stats["executed"], flaky_stats["failures"]) == (2, 1, 1)


# -- side effects and flags --------------------------------------------------------------------


async def test_side_effecting_tools_run_every_time(sf: Singleflight, store_url: str) -> None:
    @pydantic_ai_tool(sf, tool_name="send", deterministic=True, side_effecting=True)
    async def send(ctx: RunContext[Deps], to: str) -> str:
        RUNS[f"send {to}"] += 1
        return f"sent to {to}"

    def notify(to: str) -> str:
        RUNS[f"notify {to}"] += 1
        return f"notified {to}"

    toolset = wrap_pydantic_ai_toolset(sf, FunctionToolset([notify]), side_effecting=True)
    turns: list[Turn] = [[call("send", {"to": "ada"}, "c1"), call("send", {"to": "ada"}, "c2"),
                          call("notify", {"to": "ada"}, "c3"), call("notify", {"to": "ada"}, "c4")],
                         "done"]
    for mode in ("record", "replay"):  # side effects run in replay too
        with Session(store_url, mode=mode, secret=SECRET):
            agent = Agent(scripted(turns), deps_type=Deps, toolsets=[toolset])
            agent.tool(send)
            assert returns(await agent.run("go", deps=Deps("x"))) == \
                ["sent to ada"] * 2 + ["notified ada"] * 2
    assert RUNS == {"send ada": 4, "notify ada": 4}
    assert list(sf.store.iter_receipts()) == []


# -- replay ------------------------------------------------------------------------------------


def weather(ctx: RunContext[Deps], city: str) -> str:
    """Look up the weather in a city."""
    RUNS[city] += 1
    return f"sunny in {city}"


def forecast(city: str, days: int = 3) -> str:
    """Forecast the weather."""
    RUNS[f"forecast {city}"] += 1
    return f"{days} sunny days in {city}"


def weather_agent(sf: Singleflight, tool: str, city: str) -> Agent[Deps, str]:
    toolset = wrap_pydantic_ai_toolset(sf, FunctionToolset([forecast]), bounded_read=True)
    agent = Agent(scripted([[call(tool, {"city": city}, "c1")], "done"]), deps_type=Deps,
                  toolsets=[toolset])
    agent.tool(pydantic_ai_tool(sf, weather, bounded_read=True))
    return agent


@pytest.mark.parametrize(("tool", "tool_name"), [("weather", f"{__name__}.weather"),
                                                 ("forecast", "pydantic_ai.tool.forecast")])
async def test_replay_serves_recorded_calls_and_a_miss_fails_the_run(
        sf: Singleflight, store_url: str, tool: str, tool_name: str) -> None:
    recorded = await weather_agent(sf, tool, "Oslo").run("go", deps=Deps("ada"))  # the app's engine
    assert RUNS == {"Oslo": 1} or RUNS == {"forecast Oslo": 1}
    recorded_runs = dict(RUNS)

    with session(store_url, mode="replay", secret=SECRET) as run, run.scope("t") as scope:
        served = await weather_agent(sf, tool, "Oslo").run("go", deps=Deps("grace"))
        with pytest.raises(ReplayMissError, match=rf"^{tool_name}: no receipt to replay for "
                                                  rf"arguments .*Bergen"):
            await weather_agent(sf, tool, "Bergen").run("go", deps=Deps("ada"))
    assert returns(served) == returns(recorded)
    assert dict(RUNS) == recorded_runs  # nothing ran in replay
    assert [str(o.source) for o in scope.outcomes] == ["cache_hit"]
    assert [m.tool_name for m in scope.misses] == [tool_name]
    assert sf.current_mode() == "record"  # the session has ended
    assert len(list(sf.store.iter_receipts())) == 1  # nothing was recorded in replay


async def test_replay_refuses_a_tool_without_a_flag(sf: Singleflight, store_url: str) -> None:
    agent = Agent(scripted([[call("t_quote", {"symbol": "EQNR"}, "c")], "done"]))
    agent.tool_plain(pydantic_ai_tool(sf, t_quote))  # no flag: runs every call, never shared
    for _ in range(2):
        assert returns(await agent.run("go")) == [42.0]
    assert RUNS == {"quote": 2} and list(sf.store.iter_receipts()) == []
    with session(store_url, mode="replay", secret=SECRET), \
            pytest.raises(ReplayMissError, match="declares no safety flag"):
        await agent.run("go")
    assert RUNS == {"quote": 2}


# -- packaging ---------------------------------------------------------------------------------


def test_importing_the_library_does_not_import_pydantic_ai() -> None:
    code = ("import sys, singleflight_agents, singleflight_agents.adapters as a; "
            "from singleflight_agents import Singleflight; "
            "assert 'pydantic_ai' not in sys.modules, 'imported'; "
            "a.pydantic_ai_tool; assert 'pydantic_ai' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_missing_pydantic_ai_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in {"pydantic_ai", *(n for n in sys.modules if n.startswith("pydantic_ai."))}:
        monkeypatch.setitem(sys.modules, name, None)  # "import pydantic_ai..." now fails
    monkeypatch.delitem(sys.modules, "singleflight_agents.adapters.pydantic_ai", raising=False)
    for name in ("pydantic_ai_tool", "wrap_pydantic_ai_toolset"):
        monkeypatch.delattr(adapters, name, raising=False)  # the package caches loaded names
    with pytest.raises(ImportError, match=r"pip install 'singleflight-agents\[pydantic-ai\]'") as raised:
        importlib.import_module("singleflight_agents.adapters.pydantic_ai")
    assert raised.value.name == "pydantic_ai"
    with pytest.raises(ImportError, match=r"pip install 'singleflight-agents\[pydantic-ai\]'"):
        adapters.pydantic_ai_tool  # noqa: B018


@pytest.mark.slow
async def test_the_demo_runs_offline(sf: Singleflight, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("pydantic_ai_demo",
                                                  ROOT / "examples" / "pydantic_ai_demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pydantic_ai_demo", demo)  # as `python examples/...` has it
    spec.loader.exec_module(demo)
    lines: list[str] = []
    result = await demo.run_demo(sf, emit=lines.append)
    assert (result["calls"], result["baseline_executions"], result["executions"]) == (7, 7, 3)
    summary = result["summary"]
    assert (summary["calls"], summary["unique_executions"], summary["avoided_calls"]) == (7, 3, 4)
    assert "7 executions" in lines[1] and "3 executions" in lines[2]


# -- pytest-xdist: one execution across workers ------------------------------------------------

PAITOOLS = '''
import json
import os
from pathlib import Path

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import FunctionModel

from singleflight_agents import Singleflight
from singleflight_agents.adapters import pydantic_ai_tool, wrap_pydantic_ai_toolset
from pydantic_ai.toolsets import DynamicToolset, FunctionToolset

HERE = Path(__file__).parent
sf = Singleflight()  # the app's engine, made at import: the plugin's session governs it


def _append(name, record):
    with open(HERE / name, "a") as handle:
        handle.write(json.dumps(record) + "\\n")


@pydantic_ai_tool(sf, bounded_read=True, estimated_cost_usd=0.1)
def lookup(ctx: RunContext[str], account: str) -> dict:
    _append("executions.log", ["lookup", account])
    return {"account": account, "owner": ctx.deps}


def rates(base: str) -> dict:
    _append("executions.log", ["rates", base])
    return {"base": base}


def agent_for(account):
    def respond(messages, info):
        if len(messages) == 1:
            return ModelResponse(parts=[
                ToolCallPart("lookup", {"account": account}, tool_call_id="c1"),
                ToolCallPart("lookup", {"account": account}, tool_call_id="c2"),
                ToolCallPart("rates", {"base": "EUR"}, tool_call_id="c3")])
        return ModelResponse(parts=[TextPart("done")])

    toolset = wrap_pydantic_ai_toolset(sf, FunctionToolset([rates]), deterministic=True)
    agent = Agent(FunctionModel(respond), deps_type=str, toolsets=[toolset])
    agent.tool(lookup)
    return agent
'''


@pytest.mark.slow
def test_xdist_workers_share_pydantic_ai_tool_executions(
        pytester: pytest.Pytester, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "PYTEST_XDIST_WORKER",
                 "PYTEST_XDIST_AUTO_NUM_WORKERS", "SINGLEFLIGHT_SESSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", SECRET)  # a Redis store keeps no key file
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(paitools=PAITOOLS)
    pytester.makepyfile(test_agents=textwrap.dedent("""
        import json
        import os

        import pytest
        import paitools

        @pytest.mark.parametrize("i", range(6))
        def test_agent(i):
            account = "ab"[i % 2]
            result = paitools.agent_for(account).run_sync("go", deps=f"user{i}")
            assert result.output == "done"
            with open("workers.log", "a") as handle:
                handle.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--singleflight-db={store_url}",
                                           "-n", "2", timeout=120)
    result.assert_outcomes(passed=6)
    executions = [json.loads(line) for line in
                  (pytester.path / "executions.log").read_text().splitlines()]
    assert sorted(executions) == [["lookup", "a"], ["lookup", "b"], ["rates", "EUR"]]
    workers = set((pytester.path / "workers.log").read_text().split())
    assert workers == {"gw0", "gw1"}  # both workers took part
    assert "18 calls, 3 executed" in result.stdout.str()
