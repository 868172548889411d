"""The LangChain / LangGraph chat model wrapper against the real packages: agent turns shared and
replayed, what is keyed, message fidelity, tokens and dollars, the pytest plugin."""

from __future__ import annotations

import asyncio
import datetime
import re
import textwrap
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from _fake_models import GATE, Chat, Echo, Finish
from conftest import SECRET
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableLambda
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import BaseModel, Field, create_model

from singleflight_agents import ReplayMissError, Session, Singleflight
from singleflight_agents.adapters import receipt_chat_model
from singleflight_agents.reporting import format_line, format_summary

CALLS: list[str] = []  # one entry per inner model call: the type of the last message it got
TOOL_RUNS: list[str] = []
PRICES = {"fake-1": {"input": 2.0, "output": 8.0}}
TURN_DOLLARS = (100 * 2.0 + 20 * 8.0) / 1_000_000


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    TOOL_RUNS.clear()


class FakeChat(BaseChatModel):
    """After a human message it calls the first bound tool with ``{"city": <message>}`` (or
    echoes it when no tool is bound); after tool results it answers with them. Every turn
    uses 100 input and 20 output tokens. ``fail`` makes any call raise."""

    model_name: str = "fake-1"
    temperature: float = 0.0
    # Test knobs, not settings of the answer: excluded from the model's data, so not keyed.
    delay: float = Field(0.0, exclude=True)
    fail: bool = Field(False, exclude=True)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if self.fail:
            raise AssertionError("the inner model was called")
        CALLS.append(messages[-1].type)
        time.sleep(self.delay)
        last, tools = messages[-1], kwargs.get("tools") or []
        message = AIMessage(
            content="", additional_kwargs={"refusal": None},
            response_metadata={"model_name": self.model_name, "finish_reason": "stop"},
            usage_metadata={"input_tokens": 100, "output_tokens": 20, "total_tokens": 120,
                            "input_token_details": {"cache_read": 10}})
        if isinstance(last, HumanMessage) and tools:
            message.tool_calls = [{"name": tools[0]["function"]["name"], "type": "tool_call",
                                   "args": {"city": str(last.content)}, "id": "call_0"}]
            message.invalid_tool_calls = [{"name": "weather", "args": "{oops", "id": "call_9",
                                           "error": "bad JSON", "type": "invalid_tool_call"}]
        elif isinstance(last, HumanMessage):
            message.content = f"echo: {last.content}"
        else:
            message.content = "final: " + " | ".join(
                str(m.content) for m in messages if isinstance(m, ToolMessage))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"logprobs": None})],
                          llm_output={"system_fingerprint": "fp_1"})

    def bind_tools(self, tools: Any, *, tool_choice: str | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    @property
    def _llm_type(self) -> str:
        return "fake-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature}


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    TOOL_RUNS.append(city)
    return f"sunny in {city}"


@tool("weather")
def weather_v2(city: str, units: str = "C") -> str:
    """The weather in a city."""
    return f"sunny in {city} ({units})"


class Weather(BaseModel):
    city: str


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def agent_graph(chat: BaseChatModel) -> Any:
    """model -> ToolNode -> model."""
    bound = chat.bind_tools([weather])

    def model(state: State) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    async def amodel(state: State) -> dict[str, Any]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    builder = StateGraph(State)
    builder.add_node("model", RunnableLambda(model, afunc=amodel))
    builder.add_node("tools", ToolNode([weather]))
    builder.add_edge(START, "model")
    builder.add_conditional_edges("model", tools_condition)
    builder.add_edge("tools", "model")
    return builder.compile()


def ask(city: str) -> dict[str, Any]:
    return {"messages": [HumanMessage(city)]}


def answer(final: dict[str, Any]) -> Any:
    return final["messages"][-1].content


# -- 1, 2. agents: one inner call per distinct turn -----------------------------------------


def test_agent_run_twice_calls_the_model_once_per_turn(sf: Singleflight) -> None:
    graph = agent_graph(receipt_chat_model(sf, FakeChat(), deterministic=True))
    first, second = graph.invoke(ask("Paris")), graph.invoke(ask("Paris"))
    assert answer(first) == answer(second) == "final: sunny in Paris"
    assert CALLS == ["human", "tool"]  # 2 inner calls, not 4
    assert TOOL_RUNS == ["Paris", "Paris"]  # the tool is not wrapped: it runs every time
    stats = sf.summary()["tools"]["model:fake-1"]
    assert (stats["calls"], stats["executed"], stats["cache_hits"]) == (4, 2, 2)


async def test_parallel_async_runs_share_each_turn(sf: Singleflight) -> None:
    graph = agent_graph(receipt_chat_model(sf, FakeChat(delay=0.05), deterministic=True))
    finals = await asyncio.gather(*(graph.ainvoke(ask("Paris")) for _ in range(4)))
    assert [answer(f) for f in finals] == ["final: sunny in Paris"] * 4
    assert CALLS == ["human", "tool"]
    stats = sf.summary()["tools"]["model:fake-1"]
    assert (stats["calls"], stats["executed"]) == (8, 2)


def test_parallel_threads_share_each_turn(sf: Singleflight) -> None:
    graph = agent_graph(receipt_chat_model(sf, FakeChat(delay=0.05), deterministic=True))
    start = threading.Barrier(4)

    def run(_: int) -> Any:
        start.wait()
        return answer(graph.invoke(ask("Rome")))

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, range(4))) == ["final: sunny in Rome"] * 4
    assert CALLS == ["human", "tool"]
    stats = sf.summary()["tools"]["model:fake-1"]
    assert (stats["calls"], stats["executed"]) == (8, 2)


# -- 3. replay ------------------------------------------------------------------------------


def test_replay_serves_recorded_turns_and_a_new_turn_raises(sf: Singleflight,
                                                            store_url: str) -> None:
    recorded = agent_graph(receipt_chat_model(sf, FakeChat(), deterministic=True)).invoke(
        ask("Paris"))
    with Singleflight(store=store_url, secret=SECRET, mode="replay") as replayer:
        graph = agent_graph(receipt_chat_model(replayer, FakeChat(fail=True), deterministic=True))
        assert answer(graph.invoke(ask("Paris"))) == answer(recorded) == "final: sunny in Paris"
        with pytest.raises(ReplayMissError) as miss:
            graph.invoke(ask("Oslo"))
    assert miss.value.tool_name == "model:fake-1"
    assert '"Oslo"' in str(miss.value)
    assert "record it with: pytest --singleflight-mode=record" in str(miss.value)
    assert CALLS == ["human", "tool"]


def test_a_replay_session_governs_a_model_wrapped_on_a_recording_engine(
        sf: Singleflight, store_url: str) -> None:
    graph = agent_graph(receipt_chat_model(sf, FakeChat(), deterministic=True))
    recorded = graph.invoke(ask("Paris"))
    with Session(store_url, mode="replay", secret=SECRET, record_command="make evals") as run, \
            run.scope("eval") as scope:
        replaying = agent_graph(receipt_chat_model(sf, FakeChat(fail=True), deterministic=True))
        assert answer(replaying.invoke(ask("Paris"))) == answer(recorded)
        with pytest.raises(ReplayMissError, match="record it with: make evals"):
            replaying.invoke(ask("Oslo"))
    assert CALLS == ["human", "tool"]  # recorded once, never called in replay
    assert [str(o.source) for o in scope.outcomes] == ["cache_hit"] * 2
    assert [m.tool_name for m in scope.misses] == ["model:fake-1"]


# -- 4. what is keyed -----------------------------------------------------------------------


def test_system_message_tools_and_parameters_are_keyed_message_ids_are_not(
        sf: Singleflight) -> None:
    chat = receipt_chat_model(sf, FakeChat(), deterministic=True)
    base = [SystemMessage("Be terse."), HumanMessage("Paris")]

    def calls_after(runnable: Runnable[Any, Any], messages: list[BaseMessage],
                    **kwargs: Any) -> int:
        runnable.invoke(messages, **kwargs)
        return len(CALLS)

    tools = chat.bind_tools([weather])
    assert calls_after(tools, base) == 1
    assert calls_after(tools, [SystemMessage("Be terse.", id="s1"), HumanMessage("Paris", id="h1")]) == 1
    assert calls_after(tools, [SystemMessage("Be verbose."), base[1]]) == 2
    assert calls_after(chat.bind_tools([weather_v2]), base) == 3  # same name, new schema
    assert calls_after(chat.bind_tools([weather], tool_choice="weather"), base) == 4
    assert calls_after(tools, base, temperature=0.3) == 5  # a call parameter
    warm = receipt_chat_model(sf, FakeChat(temperature=0.7), deterministic=True)
    assert calls_after(warm.bind_tools([weather]), base) == 6  # a model parameter
    assert calls_after(tools, base, stop=["\n"]) == 7
    # A response_format class is keyed by its schema, not only its name.
    one = create_model("Answer", city=(str, ...))
    two = create_model("Answer", city=(str, ...), units=(str, "C"))
    assert calls_after(chat, base, response_format=one) == 8
    assert calls_after(chat, base, response_format=one) == 8
    assert calls_after(chat, base, response_format=two) == 9
    assert calls_after(tools, base) == 9


# -- 5. fidelity ----------------------------------------------------------------------------


def _fields(message: BaseMessage) -> dict[str, Any]:
    assert type(message) is AIMessage
    return {name: getattr(message, name) for name in (
        "content", "tool_calls", "invalid_tool_calls", "usage_metadata", "response_metadata",
        "additional_kwargs", "name")}


@pytest.mark.parametrize("with_tools", [True, False])
def test_replayed_message_equals_the_original(sf: Singleflight, store_url: str,
                                              with_tools: bool) -> None:
    def bound(model: BaseChatModel) -> Runnable[Any, Any]:
        return model.bind_tools([weather]) if with_tools else model

    direct = bound(FakeChat()).invoke("Paris")
    chat = bound(receipt_chat_model(sf, FakeChat(), deterministic=True))
    executed, served = chat.invoke("Paris"), chat.invoke("Paris")
    with Singleflight(store=store_url, secret=SECRET, mode="replay") as other:
        replayed = bound(receipt_chat_model(other, FakeChat(fail=True),
                                            deterministic=True)).invoke("Paris")
    assert _fields(executed) == _fields(served) == _fields(replayed) == _fields(direct)
    assert bool(direct.tool_calls) is with_tools
    assert direct.response_metadata["system_fingerprint"] == "fp_1"  # from llm_output
    assert len(CALLS) == 2  # direct, then the wrapper's one execution


def test_response_metadata_values_round_trip(sf: Singleflight, chat_calls: list[Any]) -> None:
    created = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC)
    chat = receipt_chat_model(sf, Chat(metadata_extra={"created": created}), deterministic=True)
    executed, served = chat.invoke("hi"), chat.invoke("hi")
    assert len(chat_calls) == 1
    assert executed.response_metadata["created"] == served.response_metadata["created"] == created


def test_an_enum_in_response_metadata_is_still_recorded(sf: Singleflight, chat_calls: list[Any]) -> None:
    chat = receipt_chat_model(sf, Echo(finish=Finish.STOP), deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first, second = chat.invoke("hi"), chat.invoke("hi")
    assert len(chat_calls) == 1 and first.content == second.content


# -- 6. errors ------------------------------------------------------------------------------


def test_an_unflagged_model_is_called_every_time_and_stores_nothing(
        sf: Singleflight, store_url: str) -> None:
    # One policy everywhere: a model without a flag is accepted and never shared.
    chat = receipt_chat_model(sf, FakeChat())
    with Session(store_url, secret=SECRET) as run, run.scope("unflagged") as scope:
        assert chat.invoke("hi").content == chat.invoke("hi").content == "echo: hi"
        assert list(run.engine.store.iter_receipts()) == []
        stats = run.engine.summary()["tools"]["model:fake-1"]
    assert CALLS == ["human", "human"]
    assert [str(o.source) for o in scope.outcomes] == ["executed_unshared"] * 2
    assert all(o.receipt is None for o in scope.outcomes)
    assert (stats["calls"], stats["unshared"], stats["executed"], stats["cache_hits"]) == (2, 2, 0, 0)


def test_mode_is_not_an_option_of_the_wrapper(sf: Singleflight) -> None:
    with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
        receipt_chat_model(sf, FakeChat(), deterministic=True, mode="replay")
    with pytest.raises(TypeError, match=r"record_command= .* belongs to the run"):
        receipt_chat_model(sf, FakeChat(), deterministic=True, record_command="make evals")


def test_model_name_and_model_type_are_required(sf: Singleflight) -> None:
    with pytest.raises(TypeError, match="model_name="):
        receipt_chat_model(sf, FakeChat(model_name=""), deterministic=True)
    with pytest.raises(TypeError, match="BaseChatModel"):
        receipt_chat_model(sf, FakeChat().bind_tools([weather]), deterministic=True)  # type: ignore[arg-type]
    named = receipt_chat_model(sf, FakeChat(model_name=""), model_name="mine", deterministic=True)
    named.invoke("hi")
    assert "model:mine" in sf.summary()["tools"]


def test_bind_tools_needs_an_inner_bind_tools(sf: Singleflight) -> None:
    class Plain(BaseChatModel):
        model_name: str = "plain"

        def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                      run_manager: Any = None, **kwargs: Any) -> ChatResult:
            return ChatResult(generations=[ChatGeneration(message=AIMessage("ok"))])

        @property
        def _llm_type(self) -> str:
            return "plain"

    chat = receipt_chat_model(sf, Plain(), deterministic=True)
    assert chat.invoke("hi").content == "ok"
    with pytest.raises(NotImplementedError, match="Plain does not implement bind_tools"):
        chat.bind_tools([weather])


def test_rewrapping_a_wrapped_chat_model_wraps_the_original(sf: Singleflight) -> None:
    original = Echo()
    once = receipt_chat_model(sf, original, deterministic=True)
    twice = receipt_chat_model(sf, once, deterministic=True, ttl_seconds=60)
    assert twice.inner is original


# -- 7. tokens and dollars ------------------------------------------------------------------


def test_tokens_and_dollars_spent_and_saved(sf: Singleflight, store_url: str) -> None:
    graph = agent_graph(receipt_chat_model(sf, FakeChat(), deterministic=True, prices=PRICES))
    for _ in range(3):  # 2 turns executed, then 4 served
        graph.invoke(ask("Paris"))
    unpriced = receipt_chat_model(sf, FakeChat(), model_name="fake-unpriced", deterministic=True)
    unpriced.invoke("hi")
    unpriced.invoke("hi")

    tools = sf.summary()["tools"]
    priced = tools["model:fake-1"]
    assert (priced["tokens_in"], priced["tokens_out"]) == (200, 40)
    assert (priced["tokens_in_saved"], priced["tokens_out_saved"]) == (400, 80)
    assert priced["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)
    assert priced["dollars_saved"] == pytest.approx(4 * TURN_DOLLARS)
    assert priced["unpriced"] == 0
    free = tools["model:fake-unpriced"]
    assert (free["tokens_in"], free["tokens_out"], free["tokens_in_saved"]) == (100, 20, 100)
    assert (free["dollars_spent"], free["dollars_saved"], free["unpriced"]) == (0, 0, 2)

    # The engine's price table applies when the wrapper is given none.
    with Singleflight(store=store_url, secret=SECRET, prices=PRICES) as engine:
        receipt_chat_model(engine, FakeChat(), deterministic=True).invoke("new question")
        assert engine.summary()["tools"]["model:fake-1"]["dollars_spent"] == pytest.approx(
            TURN_DOLLARS)


def test_side_effecting_model_is_called_every_time_and_still_metered(sf: Singleflight) -> None:
    chat = receipt_chat_model(sf, FakeChat(), side_effecting=True, prices=PRICES)
    assert chat.invoke("hi").content == chat.invoke("hi").content == "echo: hi"
    assert CALLS == ["human", "human"]
    stats = sf.summary()["tools"]["model:fake-1"]
    assert (stats["unshared"], stats["tokens_in"], stats["tokens_out"]) == (2, 200, 40)
    assert stats["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)


def test_n_choices_sharing_one_usage_are_counted_once(store_url: str) -> None:
    with Singleflight(store=store_url, secret=SECRET, prices=PRICES) as engine:
        chat = receipt_chat_model(engine, Chat(choices=3), deterministic=True)
        assert len(chat.generate([[HumanMessage("hi")]]).generations[0]) == 3
        row = engine.summary()["tools"]["model:fake-1"]
    assert (row["tokens_in"], row["tokens_out"]) == (100, 20)


def test_a_fallback_is_spent_a_failure_is_not_and_a_later_hit_is_avoided(
        store_url: str, chat_calls: list[Any]) -> None:
    with Singleflight(store=store_url, secret=SECRET, prices=PRICES) as engine:
        gate, entered = threading.Event(), threading.Event()
        owner = receipt_chat_model(engine, Chat(gate=gate, entered=entered), deterministic=True)
        impatient = receipt_chat_model(engine, Chat(), deterministic=True, wait_timeout_seconds=0.05)
        answers: list[Any] = []
        thread = threading.Thread(target=lambda: answers.append(owner.invoke("hi")))
        thread.start()
        try:
            assert entered.wait(GATE)  # the owner's model call is in flight, and stays there
            with pytest.warns(RuntimeWarning, match="waiting for it timed out"):
                fallback = impatient.invoke("hi")  # waits 0.05 s, then calls the model itself
        finally:
            gate.set()
            thread.join(GATE)
        assert answers[0].content == fallback.content and len(chat_calls) == 2

        with pytest.raises(RuntimeError, match="the model is down"):
            receipt_chat_model(engine, Chat(fail=True), deterministic=True).invoke("other")
        assert receipt_chat_model(engine, Chat(fail=True), deterministic=True).invoke("hi").content \
            == fallback.content  # served from the owner's receipt
        row = engine.summary()["tools"]["model:fake-1"]
    assert (row["calls"], row["executed"], row["fallbacks"], row["failures"], row["cache_hits"]) \
        == (4, 1, 1, 1, 1)
    assert (row["tokens_in"], row["tokens_out"], row["tokens_in_saved"], row["tokens_out_saved"]) \
        == (200, 40, 100, 20)
    assert row["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)
    assert row["dollars_saved"] == pytest.approx(TURN_DOLLARS)


def test_a_cheap_model_turn_is_not_reported_as_zero_dollars(store_url: str) -> None:
    prices = {"echo-1": {"input": 0.10, "output": 0.40}}
    with Singleflight(store=store_url, secret=SECRET, prices=prices) as engine:
        chat = receipt_chat_model(engine, Echo(), deterministic=True)
        chat.invoke("hi")
        chat.invoke("hi")
        summary = engine.summary()
    assert summary["tools"]["model:echo-1"]["dollars_saved"] == pytest.approx(1.8e-5)
    assert summary["dollars_saved"] == pytest.approx(1.8e-5)
    text = format_summary(summary)
    assert "$0.000018" in text and "0.000018  " in text  # headline and the tool's row
    assert not re.search(r"\$0\.0+(?![0-9])", text), text  # nothing avoided shows as zero
    line = format_line(summary)  # the one-line report too
    assert "saved $0.000018 " in line and not re.search(r"\$0\.0+(?![0-9])", line), line


# -- 9. bind_tools, with_structured_output, ainvoke, stream ---------------------------------


async def test_bind_tools_structured_output_ainvoke_and_stream(sf: Singleflight) -> None:
    chat = receipt_chat_model(sf, FakeChat(), deterministic=True)
    bound = chat.bind_tools([weather])
    assert isinstance(bound, RunnableBinding) and bound.bound is chat  # the wrapper runs
    assert bound.kwargs["tools"] == [convert_to_openai_tool(weather)]

    structured = chat.with_structured_output(Weather)
    assert structured.invoke("Lima") == Weather(city="Lima")
    assert await structured.ainvoke("Lima") == Weather(city="Lima")  # sync and async: one key
    assert CALLS == ["human"]

    assert (await chat.ainvoke("hi")).content == "echo: hi"
    chunks = list(chat.stream("hi"))  # recorded whole: one chunk (and LangChain's closing one)
    assert [c.content for c in chunks if c.content] == ["echo: hi"]
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.content async for c in chat.astream("hi") if c.content] == ["echo: hi"]
    assert [m.content for m in chat.batch(["hi", "yo", "yo"])] == ["echo: hi", "echo: yo", "echo: yo"]
    assert CALLS == ["human", "human", "human"]


# -- 8. the pytest plugin -------------------------------------------------------------------


PLUGIN_TEST = '''
import os
from pathlib import Path

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from singleflight_agents.adapters import receipt_chat_model

PROMPT = "hello"


class FakeLLM(BaseChatModel):
    model_name: str = "fake-1"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        if os.environ.get("FAKE_LLM_RAISES"):
            raise AssertionError("the model was called")
        with open(Path(__file__).parent / "calls.log", "a") as log:
            log.write(str(messages[-1].content) + "\\n")
        message = AIMessage(content="echo: " + str(messages[-1].content), usage_metadata={
            "input_tokens": 100, "output_tokens": 20, "total_tokens": 120})
        return ChatResult(generations=[ChatGeneration(message=message)])

    @property
    def _llm_type(self):
        return "fake"


def test_chat(singleflight):
    chat = receipt_chat_model(singleflight, FakeLLM(), deterministic=True)
    assert chat.invoke([HumanMessage(PROMPT)]).content == "echo: " + PROMPT
'''


def test_pytest_plugin_records_then_replays_model_turns(pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "PYTEST_XDIST_WORKER",
                 "PYTEST_XDIST_AUTO_NUM_WORKERS", "FAKE_LLM_RAISES"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_chat=textwrap.dedent(PLUGIN_TEST))
    db = pytester.path / "receipts.db"
    log = pytester.path / "calls.log"

    def run(mode: str) -> pytest.RunResult:
        return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                  f"--singleflight-db={db}", f"--singleflight-mode={mode}")

    run("record").assert_outcomes(passed=1)
    assert log.read_text() == "hello\n"

    monkeypatch.setenv("FAKE_LLM_RAISES", "1")
    replayed = run("replay")
    replayed.assert_outcomes(passed=1)
    assert log.read_text() == "hello\n"  # zero inner calls
    replayed.stdout.re_match_lines([r"\s+model:fake-1\s+1\s+0\s+1\s+"])

    pytester.makepyfile(test_chat=textwrap.dedent(PLUGIN_TEST).replace(
        'PROMPT = "hello"', 'PROMPT = "hello there"'))
    changed = run("replay")
    changed.assert_outcomes(failed=1)
    out = changed.stdout.str()
    assert "ReplayMissError: model:fake-1: no receipt to replay" in out
    assert (f"record it with: pytest --singleflight-mode=record --singleflight-db={db} "
            f"test_chat.py::test_chat") in out
    assert log.read_text() == "hello\n"
