"""``function_tool`` and ``wrap_function_tool`` as the Agents SDK's own tools behave: the
callable ``__wrapped__`` gives back, ``agents.function_tool``'s keywords, and the SDK's report
of a failure (span error, log lines). Against the real SDK, offline via ScriptedModel."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import agents._debug as sdk_debug
import pytest
from agents import Agent, FunctionTool, RunConfig, Runner
from agents import function_tool as sdk_function_tool
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tool_context import ToolContext
from agents.tracing import TracingProcessor, get_trace_provider, set_trace_provider
from agents.tracing.provider import DefaultTraceProvider

from singleflight_agents import Singleflight
from singleflight_agents.adapters import function_tool, wrap_function_tool

SECRET_DETAIL = "private-detail-31337"


def plain(value: int) -> int:
    """Increment a value."""
    return value + 1


async def coroutine(value: int) -> int:
    return value + 1


def with_context(ctx: ToolContext[Any], value: int) -> int:
    return value + 1


@functools.wraps(plain)
def decorated(value: int) -> int:
    return plain(value)


class Handler:
    def method(self, value: int) -> int:
        return value + 1

    async def __call__(self, value: int) -> int:
        return value + 1


@pytest.mark.parametrize("func", [plain, coroutine, with_context, decorated, Handler().method],
                         ids=["sync", "async", "context", "decorated", "bound-method"])
async def test_wrapped_is_the_users_function_and_calling_it_bypasses_the_engine(
        sqlite_sf: Singleflight, func: Any) -> None:
    before = dict(func.__dict__)
    tool = function_tool(sqlite_sf, func, deterministic=True, tool_name="inc")
    assert tool.__wrapped__ is func
    assert func.__dict__ == before  # the user's function is not touched
    assert inspect.unwrap(tool.__wrapped__) is inspect.unwrap(func)  # plain for `decorated`
    args = (None, 1) if func is with_context else (1,)
    result = tool.__wrapped__(*args)
    assert (await result if inspect.isawaitable(result) else result) == 2
    assert sqlite_sf.summary()["tools"] == {}  # a direct call is not the tool's call
    assert await tool.on_invoke_tool(_context(tool), '{"value": 1}') == 2
    assert sqlite_sf.summary()["tools"]["inc"]["calls"] == 1  # the tool's call is


async def test_wrapped_survives_copies_and_goes_when_the_invoker_is_replaced(
        sqlite_sf: Singleflight) -> None:
    handler = Handler()
    for tool in (function_tool(sqlite_sf, plain, deterministic=True),
                 function_tool(sqlite_sf, handler, deterministic=True),  # a callable object
                 wrap_function_tool(sqlite_sf, sdk_function_tool(plain), deterministic=True)):
        expected = handler if tool.name == "Handler" else plain
        assert tool.__wrapped__ is expected
        for clone in (copy.copy(tool), copy.deepcopy(tool), dataclasses.replace(tool, name="x")):
            assert clone.__wrapped__ is expected

        async def replacement(ctx: ToolContext[Any], arguments: str) -> str:
            return arguments

        tool.on_invoke_tool = replacement
        assert not hasattr(tool, "__wrapped__")


def test_the_sdks_keywords_are_keyword_only_with_its_defaults(sqlite_sf: Singleflight) -> None:
    ours = inspect.signature(function_tool).parameters
    sdk = {n: p for n, p in inspect.signature(sdk_function_tool).parameters.items() if n != "func"}
    assert sdk  # what an SDK release declares, ours declares too, as it does
    for name, param in sdk.items():
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert ours[name].default is param.default or ours[name].default == param.default, name
    # Bound to an engine, a drop-in for agents.function_tool: its parameters, in its order.
    bound = inspect.signature(functools.partial(function_tool, sqlite_sf, deterministic=True))
    assert [(n, p.kind) for n, p in bound.parameters.items() if n != "options"] == [
        (n, p.kind) for n, p in inspect.signature(sdk_function_tool).parameters.items()]
    assert function_tool(sqlite_sf, func=plain).__wrapped__ is plain  # func= as the SDK takes it
    with pytest.raises(TypeError):
        function_tool(sqlite_sf, plain, None)  # type: ignore[call-overload]


async def test_given_keywords_reach_the_sdk_and_the_rest_keep_its_defaults(
        sqlite_sf: Singleflight) -> None:
    expected = sdk_function_tool(coroutine, timeout=5, timeout_behavior="raise_exception",
                                 defer_loading=True, name_override="inc")
    tool = function_tool(sqlite_sf, coroutine, timeout=5, timeout_behavior="raise_exception",
                         defer_loading=True, name_override="inc", deterministic=True)
    for field in ("name", "timeout_seconds", "timeout_behavior", "defer_loading",
                  "strict_json_schema", "needs_approval", "params_json_schema"):
        assert getattr(tool, field) == getattr(expected, field), field

    def failing(value: int) -> int:
        raise ValueError(SECRET_DETAIL)

    default = function_tool(sqlite_sf, failing, tool_name="failing")
    assert "error occurred" in await default.on_invoke_tool(_context(default), '{"value": 1}')
    raising = function_tool(sqlite_sf, failing, tool_name="failing", failure_error_function=None)
    with pytest.raises(ValueError, match=SECRET_DETAIL):
        await raising.on_invoke_tool(_context(raising), '{"value": 1}')


class _Spans(TracingProcessor):
    def __init__(self) -> None:
        self.ended: list[dict[str, Any]] = []

    def on_trace_start(self, trace: Any) -> None: ...
    def on_trace_end(self, trace: Any) -> None: ...
    def on_span_start(self, span: Any) -> None: ...

    def on_span_end(self, span: Any) -> None:
        self.ended.append(span.export() or {})

    def shutdown(self) -> None: ...
    def force_flush(self) -> None: ...


@pytest.fixture
def spans() -> Iterator[_Spans]:
    yield from collecting_spans()


def collecting_spans() -> Iterator[_Spans]:
    """The spans the SDK ends while this runs (its global trace provider restored after)."""
    collector, previous, provider = _Spans(), get_trace_provider(), DefaultTraceProvider()
    provider.set_processors([collector])
    set_trace_provider(provider)
    yield collector
    set_trace_provider(previous)


def _failing_tools(sf: Singleflight) -> list[FunctionTool]:
    async def error_tool() -> str:
        raise ValueError(SECRET_DETAIL)

    built = sdk_function_tool(error_tool)
    return [function_tool(sf, error_tool, tool_name="error_tool", deterministic=True),
            wrap_function_tool(sf, built, deterministic=True)]


@pytest.mark.parametrize("which", [0, 1], ids=["function_tool", "wrap_function_tool"])
@pytest.mark.parametrize("local_detail", [False, True], ids=["tool-data-hidden", "tool-data-logged"])
async def test_a_failure_is_reported_as_the_sdk_reports_it(
        sqlite_sf: Singleflight, spans: _Spans, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, which: int, local_detail: bool) -> None:
    monkeypatch.setattr(sdk_debug, "DONT_LOG_TOOL_DATA", not local_detail)
    tool = _failing_tools(sqlite_sf)[which]
    model = ScriptedModel([[function_call("error_tool", "{}", call_id="c1")],
                           [assistant_message("recovered")]])
    with caplog.at_level(logging.DEBUG, logger="openai.agents"):
        result = await Runner.run(Agent(name="a", model=model, tools=[tool]), "go",
                                  run_config=RunConfig(trace_include_sensitive_data=False))
    assert result.final_output == "recovered"
    errors = [s["error"] for s in spans.ended
              if s.get("span_data", {}).get("type") == "function" and s.get("error")]
    assert errors == [{"message": "Error running tool (non-fatal)",
                       "data": {"tool_name": "error_tool",
                                "error": "Tool execution failed. Error details are redacted."}}]
    detailed = [r for r in caplog.records if SECRET_DETAIL in r.getMessage() and r.exc_info]
    assert bool(detailed) is local_detail  # the detail is logged exactly when the SDK allows it
    assert (SECRET_DETAIL in caplog.text) is local_detail
    name = "openai.tool.error_tool" if which else "error_tool"
    assert sqlite_sf.summary()["tools"][name]["failures"] == 1  # ran through the engine


def _context(tool: FunctionTool) -> ToolContext[Any]:
    return ToolContext(context=None, tool_name=tool.name, tool_call_id="c1", tool_arguments="{}")


async def test_a_sync_tool_that_returns_an_awaitable_hands_it_back_as_the_sdk_does(
        sqlite_sf: Singleflight) -> None:
    """The SDK passes an awaitable a sync function returns on unawaited; so do we (it is
    single-use: never stored nor shared, each call runs the function)."""
    async def twelve() -> int:
        return 12

    pending = twelve()

    def handler() -> Any:
        return pending

    tool = function_tool(sqlite_sf, handler, deterministic=True, tool_name="t.pending")
    with pytest.warns(RuntimeWarning, match="can be used only once"):
        returned = await tool.on_invoke_tool(_context(tool), "{}")
    assert returned is pending
    assert await returned == 12
