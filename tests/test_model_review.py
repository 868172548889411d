"""Review of the model-turn feature (issue 7): receipt_model, receipt_chat_model, the meter, the report.

Each bug this review found has a test here; all are fixed.
The others pin claims no other test covered: 4 spawned processes share each turn of a two-turn
agent, replay never calls the model when the receipts were signed with another key, an error in
the middle of a stream reaches the owner (after its events) and every waiter, rich output items
round-trip and keep the next turn's key, and fallbacks and failures are metered as they happened.

No sleeps synchronise anything: threads and tasks meet on events, processes on a barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import textwrap
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, ComputerTool, ModelSettings, ModelTracing, RunConfig, Runner, Usage, function_tool
from agents.computer import Computer
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from conftest import SECRET, SpyEngine
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from openai.types.responses import (
    ResponseFailedEvent,
    ResponseFunctionWebSearch,
    ResponseOutputMessage,
    ResponseOutputRefusal,
    ResponseOutputText,
    ResponseReasoningItem,
)
from openai.types.responses.response_function_web_search import ActionSearch
from openai.types.responses.response_output_text import AnnotationURLCitation
from openai.types.responses.response_reasoning_item import Summary
from pydantic import Field

from singleflight_agents import Singleflight
from singleflight_agents.adapters import receipt_chat_model
from singleflight_agents.adapters.openai_models import IncompleteStreamError, receipt_model
from singleflight_agents.reporting import format_line

SPAWN = multiprocessing.get_context("spawn")
CONFIG = RunConfig(tracing_disabled=True)
NAME = "scripted"
TOOL = f"model:{NAME}"
QUESTION = "What is the weather in Oslo?"
FINAL = "It is sunny in Oslo."
USAGE = Usage(requests=1, input_tokens=1000, output_tokens=200, total_tokens=1200)
PRICES = {NAME: {"input": 2.0, "output": 8.0}, "fake-1": {"input": 2.0, "output": 8.0}}
TURN_DOLLARS = (1000 * 2.0 + 200 * 8.0) / 1e6
KW: dict[str, Any] = {"previous_response_id": None, "conversation_id": None, "prompt": None}
GATE = 20.0  # bound for "the other caller got there"; only a hang reaches it


@function_tool
def lookup(city: str) -> str:
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    return f"sunny in {city}"


def is_turn_two(call: ModelCall) -> bool:
    return isinstance(call.input, list) and any(
        isinstance(item, dict) and item.get("type") == "function_call_output" for item in call.input)


def answer(call: ModelCall) -> list[Any]:
    if is_turn_two(call):
        return [assistant_message(FINAL)]
    return [function_call("lookup", {"city": "Oslo"}, call_id="call-1")]


def direct_args(*, input: Any = "hello", tools: list[Any] | None = None) -> tuple[Any, ...]:
    return ("Be brief.", input, ModelSettings(), tools or [], None, [], ModelTracing.DISABLED)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


async def live_events(output: list[Any]) -> list[Any]:
    """The events an unwrapped ScriptedModel streams for ``output``."""
    return await collect(ScriptedModel([output]).stream_response(*direct_args(), **KW))


def text_of(response: Any) -> str:
    return str(response.output[0].content[0].text)


def hung_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks()
            if task is not asyncio.current_task() and not task.done() and not task.cancelling()]


# -- LangChain stand-ins ---------------------------------------------------------------------

CHAT_CALLS: list[list[BaseMessage]] = []


@pytest.fixture(autouse=True)
def _reset_chat_calls() -> None:
    CHAT_CALLS.clear()


def _usage(tokens_in: int = 100, tokens_out: int = 20) -> dict[str, int]:
    return {"input_tokens": tokens_in, "output_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}


class Chat(BaseChatModel):
    """Answers with what it was sent: the text, or the bytes of a media block, and the stop
    sequences it applied. ``stop_sequences`` is a model field the request uses that
    ``_identifying_params`` does not report (as in ChatAnthropic). ``choices`` > 1 returns that
    many generations, each carrying the whole response's usage (as ChatOpenAI does for ``n``).
    ``gate`` blocks a call until set; ``fail`` raises."""

    model_name: str = "fake-1"
    temperature: float = 0.0
    stop_sequences: list[str] | None = None
    choices: int = 1
    fail: bool = Field(False, exclude=True)  # a test knob, not a setting: not keyed
    gate: Any = Field(None, exclude=True)  # test knobs too
    entered: Any = Field(None, exclude=True)
    metadata_extra: dict[str, Any] | None = None

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        CHAT_CALLS.append(messages)
        if self.entered is not None:
            self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(GATE)
        if self.fail:
            raise RuntimeError("the model is down")
        content = messages[-1].content
        if isinstance(content, list):
            text = " ".join(repr(block.get("data")) for block in content if isinstance(block, dict))
        else:
            text = f"line one: {content}\nline two"
        for sequence in stop or self.stop_sequences or []:
            text = text.split(sequence)[0]
        generations = [ChatGeneration(message=AIMessage(
            content=text, usage_metadata=_usage(),  # type: ignore[arg-type]
            response_metadata={"model_name": self.model_name, **(self.metadata_extra or {})}))
            for _ in range(self.choices)]
        return ChatResult(generations=generations)

    @property
    def _llm_type(self) -> str:
        return "review-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature}


class StreamingChat(Chat):
    """A chat model that streams: one text chunk, then one tool call chunk."""

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: Any = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        CHAT_CALLS.append(messages)
        yield ChatGenerationChunk(message=AIMessageChunk(content="checking"))
        yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[
            {"name": "weather", "args": '{"city": "Oslo"}', "id": "call_1", "index": 0}]))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        chunks = list(self._stream(messages, stop))
        merged = chunks[0].message + chunks[1].message
        return ChatResult(generations=[ChatGeneration(message=AIMessage(
            content=merged.content, tool_calls=merged.tool_calls))])


# == bugs the review found (fixed) ============================================================

# -- wrong answers: requests the model answers differently that get one key ---------------------


async def test_a_turn_in_a_server_side_conversation_is_not_replayed_after_the_conversation_grew(
        sqlite_sf: Singleflight) -> None:
    inner = ScriptedModel([[assistant_message(t)] for t in ("first answer", "other", "second answer")])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True)
    in_conversation = {**KW, "conversation_id": "conv_1"}
    with pytest.warns(RuntimeWarning, match="conversation_id .* not shared or recorded; give key="):
        texts = [text_of(await model.get_response(*direct_args(input=text), **in_conversation))
                 for text in ("What next?", "Tell me more.", "What next?")]
    # The third turn sees a conversation of four items; the model must be asked again.
    assert len(inner.calls) == 3, texts
    assert sqlite_sf.summary()["tools"][f"model:{NAME}"]["unshared"] == 3


class Screen(Computer):
    """A browser screen of a given size (what the preview computer tool tells the model)."""

    def __init__(self, width: int, height: int) -> None:
        self.size = (width, height)

    @property
    def environment(self) -> Any:
        return "browser"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.size

    def screenshot(self) -> str:
        return ""

    def click(self, x: int, y: int, button: Any) -> None: ...
    def double_click(self, x: int, y: int) -> None: ...
    def scroll(self, x: int, y: int, scroll_x: int, scroll_y: int) -> None: ...
    def type(self, text: str) -> None: ...
    def wait(self) -> None: ...
    def move(self, x: int, y: int) -> None: ...
    def keypress(self, keys: list[str]) -> None: ...
    def drag(self, path: list[tuple[int, int]]) -> None: ...


async def test_preview_computer_tools_with_different_screens_are_different_requests(
        sqlite_sf: Singleflight) -> None:
    inner = ScriptedModel([[assistant_message("click 500,300")], [assistant_message("click 900,500")]])
    model = receipt_model(sqlite_sf, inner, model_name="computer-use-preview", deterministic=True)
    for width, height in ((1024, 768), (1920, 1080)):
        await model.get_response(*direct_args(input="Click OK.",
                                               tools=[ComputerTool(Screen(width, height))]), **KW)
    assert len(inner.calls) == 2


def test_message_blocks_with_different_bytes_are_different_requests(sf: Singleflight) -> None:
    chat = receipt_chat_model(sf, Chat(), deterministic=True)

    def image(data: bytes) -> list[BaseMessage]:
        return [HumanMessage(content=[{"type": "media", "mime_type": "image/png", "data": data}])]

    first = chat.invoke(image(b"\x89PNG cat"))
    second = chat.invoke(image(b"\x89PNG dog"))
    assert len(CHAT_CALLS) == 2
    assert first.content != second.content


def test_model_fields_missing_from_identifying_params_are_still_keyed(sf: Singleflight) -> None:
    plain = receipt_chat_model(sf, Chat(), deterministic=True).invoke("hi")
    stopped = receipt_chat_model(sf, Chat(stop_sequences=["\n"]), deterministic=True).invoke("hi")
    assert plain.content == "line one: hi\nline two"
    assert stopped.content == "line one: hi"


# -- crashes and duplicate executions -------------------------------------------------------------


async def test_a_user_key_cannot_make_a_stream_share_a_plain_turns_receipt(sqlite_sf: Singleflight) -> None:
    inner = ScriptedModel([[assistant_message("plain")], [assistant_message("streamed")]])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True,
                          key=lambda request: request["input"])
    await model.get_response(*direct_args(), **KW)
    events = await collect(model.stream_response(*direct_args(), **KW))
    assert events[-1].type == "response.completed"


async def test_a_stream_that_ends_in_response_failed_is_not_stored(sf: Singleflight) -> None:
    created = (await live_events([assistant_message("x")]))[0]
    failed = ResponseFailedEvent(type="response.failed", sequence_number=1,
                                 response=created.response.model_copy(update={"status": "failed"}))

    async def failing(call: ModelCall) -> AsyncIterator[Any]:
        yield created
        yield failed

    inner = ScriptedModel([ModelStep.stream(failing), [assistant_message("recovered")]])
    model = receipt_model(sf, inner, model_name=NAME, deterministic=True)
    first: list[str] = []
    incomplete = r"without response\.completed \(last: response\.failed\)"
    with pytest.raises(IncompleteStreamError, match=incomplete):
        async for event in model.stream_response(*direct_args(), **KW):
            first.append(event.type)
    assert first == ["response.created", "response.failed"]  # delivered, then the error
    second = [e.type for e in await collect(model.stream_response(*direct_args(), **KW))]
    assert len(inner.calls) == 2 and second[-1] == "response.completed"


async def test_a_consumer_that_stops_at_response_completed_still_records_the_turn(sf: Singleflight) -> None:
    events = await live_events([assistant_message("hi")])
    closed = asyncio.Event()  # the transport closes after the terminal event

    async def stream(call: ModelCall) -> AsyncIterator[Any]:
        for event in events:
            yield event
        await closed.wait()

    inner = ScriptedModel([ModelStep.stream(stream), ModelStep.stream(stream)])
    model = receipt_model(sf, inner, model_name=NAME, deterministic=True)
    for _ in range(2):
        async with contextlib.aclosing(model.stream_response(*direct_args(), **KW)) as received:
            async for event in received:
                if event.type == "response.completed":  # all a consumer needs
                    closed.set()
                    break
    assert len(inner.calls) == 1


# -- fidelity -------------------------------------------------------------------------------------


def test_a_wrapped_streaming_model_still_streams_message_chunks(sf: Singleflight) -> None:
    unwrapped = list(StreamingChat().stream("Weather in Oslo?"))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in unwrapped)
    chunks = list(receipt_chat_model(sf, StreamingChat(), deterministic=True).stream("Weather in Oslo?"))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks), [type(c) for c in chunks]
    gathered = chunks[0]
    for chunk in chunks[1:]:
        gathered = gathered + chunk
    assert [c["name"] for c in gathered.tool_call_chunks] == ["weather"]


def test_response_metadata_values_round_trip(sf: Singleflight) -> None:
    created = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC)
    chat = receipt_chat_model(sf, Chat(metadata_extra={"created": created}), deterministic=True)
    executed, served = chat.invoke("hi"), chat.invoke("hi")
    assert len(CHAT_CALLS) == 1
    assert executed.response_metadata["created"] == served.response_metadata["created"] == created


# -- report numbers -------------------------------------------------------------------------------


def test_n_choices_sharing_one_usage_are_counted_once(store_url: str) -> None:
    with Singleflight(store=store_url, secret=SECRET, prices=PRICES) as engine:
        chat = receipt_chat_model(engine, Chat(choices=3), deterministic=True)
        assert len(chat.generate([[HumanMessage("hi")]]).generations[0]) == 3
        row = engine.summary()["tools"]["model:fake-1"]
    assert (row["tokens_in"], row["tokens_out"]) == (100, 20)


def test_the_one_line_report_does_not_round_avoided_model_dollars_to_zero(store_url: str) -> None:
    with Singleflight(store=store_url, secret=SECRET, prices=PRICES) as engine:
        chat = receipt_chat_model(engine, Chat(), deterministic=True)
        chat.invoke("hi")
        chat.invoke("hi")
        summary = engine.summary()
    assert summary["dollars_saved"] == pytest.approx((100 * 2.0 + 20 * 8.0) / 1e6)
    assert "saved $0.00 " not in format_line(summary), format_line(summary)


# -- replay misses --------------------------------------------------------------------------------


def test_call_parameters_equal_as_json_numbers_share_a_turn(sf: Singleflight) -> None:
    chat = receipt_chat_model(sf, Chat(), deterministic=True)
    chat.invoke("hi", temperature=1)
    chat.invoke("hi", temperature=1.0)
    assert len(CHAT_CALLS) == 1


# == claims that hold (not covered elsewhere) ===================================================

# -- 4 spawned processes, one SQLite store: each turn runs once in total -------------------------


def _append(log: str, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def agent_in_process(db: str, log: str, out: str, run_id: str, barrier: Any) -> None:
    """A spawned process: the two-turn agent on its own engine; each real model call is logged."""

    def respond(call: ModelCall) -> list[Any]:
        _append(log, f"{'turn-2' if is_turn_two(call) else 'turn-1'} {os.getpid()}")
        return answer(call)

    with Singleflight(db, secret=SECRET, run_id=run_id, prices=PRICES) as engine:
        model = ScriptedModel([ModelStep.respond(respond), ModelStep.respond(respond)])
        model.set_default_usage(USAGE)
        wrapped = receipt_model(engine, model, model_name=NAME, deterministic=True)
        agent = Agent(name="weather", instructions="Answer in one sentence.", tools=[lookup],
                      model=wrapped)
        barrier.wait(60)  # all four start the run together
        result = Runner.run_sync(agent, QUESTION, run_config=CONFIG)
    Path(out).write_text(json.dumps({
        "final": result.final_output, "calls": len(model.calls),
        "items": [item.to_input_item() for item in result.new_items]}, default=str))


def test_four_spawned_processes_run_each_turn_of_a_two_turn_agent_once(
        tmp_path: Path, procs: list[Any]) -> None:
    db, log, run_id = str(tmp_path / "receipts.db"), str(tmp_path / "calls.log"), "review-processes"
    barrier = SPAWN.Barrier(4)
    outs = [tmp_path / f"out-{i}.json" for i in range(4)]
    for out in outs:
        proc = SPAWN.Process(target=agent_in_process, args=(db, log, str(out), run_id, barrier),
                             daemon=True)
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join(90)
        assert proc.exitcode == 0
    results = [json.loads(out.read_text()) for out in outs]
    executions = Counter(line.split()[0] for line in Path(log).read_text().splitlines())
    assert executions == {"turn-1": 1, "turn-2": 1}
    assert sum(r["calls"] for r in results) == 2
    assert [r["final"] for r in results] == [FINAL] * 4
    assert all(r["items"] == results[0]["items"] for r in results)  # same call ids, same outputs

    with Singleflight(db, secret=SECRET, run_id=run_id) as reader:
        row = reader.summary()["tools"][TOOL]
    assert (row["calls"], row["executed"], row["cache_hits"] + row["shared_waits"]) == (8, 2, 6)
    assert (row["fallbacks"], row["failures"], row["takeovers"]) == (0, 0, 0)
    assert (row["tokens_in"], row["tokens_out"]) == (2 * 1000, 2 * 200)
    assert (row["tokens_in_saved"], row["tokens_out_saved"]) == (6 * 1000, 6 * 200)
    assert row["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)
    assert row["dollars_saved"] == pytest.approx(6 * TURN_DOLLARS)


# -- the pytest plugin: replay never calls the model, whatever key signed the receipts -----------

PLUGIN_TEST = '''
from pathlib import Path

from agents import Agent, RunConfig, Runner, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call

from singleflight_agents.adapters.openai_models import receipt_model


@function_tool
def lookup(city: str) -> str:
    """Look up the weather in a city."""
    return "sunny in " + city


def test_weather_agent(singleflight):
    model = ScriptedModel([[function_call("lookup", {"city": "Oslo"}, call_id="call-1")],
                           [assistant_message("Sunny.")]])
    agent = Agent(name="weather", instructions="Be brief.", tools=[lookup],
                  model=receipt_model(singleflight, model, model_name="scripted", deterministic=True))
    try:
        result = Runner.run_sync(agent, "Weather in Oslo?", run_config=RunConfig(tracing_disabled=True))
    finally:
        with open(Path(__file__).parent / "calls.log", "a") as log:
            log.write(f"{len(model.calls)}\\n")
    assert result.final_output == "Sunny."
'''


def test_replay_never_calls_the_model_when_receipts_were_signed_with_another_key(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "SINGLEFLIGHT_PRICES",
                 "PYTEST_XDIST_WORKER", "PYTEST_XDIST_AUTO_NUM_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_agent=textwrap.dedent(PLUGIN_TEST))
    db, log = pytester.path / "receipts.db", pytester.path / "calls.log"

    def run(mode: str, secret: str) -> pytest.RunResult:
        monkeypatch.setenv("SINGLEFLIGHT_SECRET", secret)
        return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                  f"--singleflight-db={db}", f"--singleflight-mode={mode}")

    run("record", "recording-key-" + "a" * 24).assert_outcomes(passed=1)
    assert log.read_text().split() == ["2"]

    other = run("replay", "another-branch-key-" + "b" * 24)
    other.assert_outcomes(failed=1)
    assert log.read_text().split() == ["2", "0"]  # the model was never called
    out = other.stdout.str()
    assert "ReplayMissError: model:scripted: no receipt to replay" in out
    assert (f"record it with: pytest --singleflight-mode=record --singleflight-db={db} "
            f"test_agent.py::test_weather_agent") in out
    assert "failed their signature check" in out

    run("replay", "recording-key-" + "a" * 24).assert_outcomes(passed=1)
    assert log.read_text().split() == ["2", "0", "0"]


# -- xdist: two workers, one report; the ini's price table is found from a subdirectory ----------

XDIST_TEST = """
from agents import Agent, RunConfig, Runner, Usage, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

from singleflight_agents.adapters.openai_models import receipt_model


@function_tool
def lookup(city: str) -> str:
    \"\"\"Look up the weather in a city.\"\"\"
    return "sunny in " + city


def answer(call):  # by the request, not by position: a worker may be asked turn 2 first
    if isinstance(call.input, list) and any(
            isinstance(i, dict) and i.get("type") == "function_call_output" for i in call.input):
        return [assistant_message("Sunny.")]
    return [function_call("lookup", {"city": "Oslo"}, call_id="call-1")]


def run(singleflight):
    model = ScriptedModel([ModelStep.respond(answer), ModelStep.respond(answer)])
    model.set_default_usage(Usage(requests=1, input_tokens=1000, output_tokens=200, total_tokens=1200))
    agent = Agent(name="weather", instructions="Be brief.", tools=[lookup],
                  model=receipt_model(singleflight, model, model_name="scripted", deterministic=True))
    result = Runner.run_sync(agent, "Weather in Oslo?", run_config=RunConfig(tracing_disabled=True))
    assert result.final_output == "Sunny."


def test_one(singleflight):
    run(singleflight)


def test_two(singleflight):
    run(singleflight)
"""


def test_xdist_workers_add_up_to_one_report_priced_from_the_ini(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("xdist")
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "SINGLEFLIGHT_PRICES",
                 "PYTEST_XDIST_WORKER", "PYTEST_XDIST_AUTO_NUM_WORKERS", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SINGLEFLIGHT_SECRET", SECRET)
    pytester.makeini("[pytest]\nsingleflight_prices = prices.json\n")
    (pytester.path / "prices.json").write_text(json.dumps({NAME: [2.0, 8.0]}))
    sub = pytester.mkpydir("evals")
    (sub / "test_evals.py").write_text(textwrap.dedent(XDIST_TEST))
    monkeypatch.chdir(sub)  # run from a subdirectory: the ini's relative paths are the rootdir's
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                           "-n", "2", "--singleflight-report=report.json")
    result.assert_outcomes(passed=2)
    report = json.loads((sub / "report.json").read_text())
    row = report["tools"][TOOL]
    assert (row["calls"], row["executed"], row["cache_hits"] + row["shared_waits"]) == (4, 2, 2)
    assert (row["tokens_in"], row["tokens_in_saved"], row["unpriced"]) == (2000, 2000, 0)
    assert row["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)
    assert row["dollars_saved"] == pytest.approx(2 * TURN_DOLLARS)
    assert (pytester.path / ".singleflight" / "receipts.db").exists()
    assert "no price" not in result.stdout.str()


# -- streams: an error mid-stream reaches the owner after its events, and every waiter ----------


async def test_an_error_mid_stream_reaches_the_owner_after_its_events_and_every_waiter(
        spy: SpyEngine) -> None:
    events = await live_events([assistant_message(FINAL)])
    release = asyncio.Event()

    async def breaks(call: ModelCall) -> AsyncIterator[Any]:
        yield events[0]
        await release.wait()
        raise ConnectionError("stream reset by peer")

    owner_model, waiter_model = ScriptedModel([ModelStep.stream(breaks)]), ScriptedModel([])
    owner = receipt_model(spy, owner_model, model_name=NAME, deterministic=True)
    waiters = [receipt_model(spy, waiter_model, model_name=NAME, deterministic=True) for _ in range(2)]

    received: list[str] = []

    async def consume_owner() -> None:
        async for event in owner.stream_response(*direct_args(), **KW):
            received.append(event.type)

    owned = asyncio.ensure_future(consume_owner())
    waiting = [asyncio.ensure_future(collect(w.stream_response(*direct_args(), **KW))) for w in waiters]
    await asyncio.wait_for(spy.reached(3).wait(), GATE)  # both waiters wait on the owner's turn
    release.set()
    results = await asyncio.wait_for(asyncio.gather(owned, *waiting, return_exceptions=True), GATE)
    assert [type(r) for r in results] == [ConnectionError] * 3
    assert received == ["response.created"]  # the owner's consumer got what streamed first
    assert (len(owner_model.calls), len(waiter_model.calls)) == (1, 0)
    assert list(spy.store.iter_receipts()) == []
    assert hung_tasks() == []

    later = ScriptedModel([[assistant_message(FINAL)]])
    recorded = await collect(receipt_model(spy, later, model_name=NAME, deterministic=True)
                             .stream_response(*direct_args(), **KW))
    assert recorded[-1].type == "response.completed" and len(later.calls) == 1
    row = spy.summary()["tools"][TOOL]
    assert (row["calls"], row["failures"], row["executed"], row["shared_waits"]) == (4, 1, 1, 0)


# -- fidelity of rich output items, and the next turn's key after a replay ---------------------


def rich_output() -> list[Any]:
    return [
        ResponseReasoningItem(id="rs_1", type="reasoning", encrypted_content="gAAAA-opaque",
                              summary=[Summary(type="summary_text", text="Looked it up.")]),
        ResponseFunctionWebSearch(id="ws_1", type="web_search_call", status="completed",
                                  action=ActionSearch(type="search", query="Oslo weather")),
        ResponseOutputMessage(id="msg_1", type="message", role="assistant", status="completed", content=[
            ResponseOutputText(type="output_text", text="Sunny [1].", logprobs=[], annotations=[
                AnnotationURLCitation(type="url_citation", url="https://met.no", title="MET",
                                      start_index=7, end_index=10)])]),
        ResponseOutputMessage(id="msg_2", type="message", role="assistant", status="completed", content=[
            ResponseOutputRefusal(type="refusal", refusal="I cannot share the forecast source.")]),
    ]


async def test_reasoning_search_citations_and_refusals_replay_and_keep_the_next_turns_key(
        sf: Singleflight) -> None:
    original = await ScriptedModel([rich_output()]).get_response(*direct_args(), **KW)
    inner = ScriptedModel([rich_output(), [assistant_message("turn two")]])
    model = receipt_model(sf, inner, model_name=NAME, deterministic=True)
    executed = await model.get_response(*direct_args(), **KW)
    replayed = await receipt_model(sf, ScriptedModel([]), model_name=NAME,
                                   deterministic=True).get_response(*direct_args(), **KW)
    assert replayed == executed == original
    dumps = [[item.model_dump(exclude_unset=True) for item in r.output] for r in (original, replayed)]
    assert dumps[0] == dumps[1]

    def next_input(response: Any) -> list[Any]:
        return [{"role": "user", "content": "hello"}, *response.to_input_items(),
                {"role": "user", "content": "And tomorrow?"}]

    assert next_input(replayed) == next_input(original)
    await model.get_response(*direct_args(input=next_input(original)), **KW)
    second = await receipt_model(sf, ScriptedModel([]), model_name=NAME, deterministic=True) \
        .get_response(*direct_args(input=next_input(replayed)), **KW)
    assert text_of(second) == "turn two" and len(inner.calls) == 2


# -- the meter: fallbacks and failures are counted as they happened ------------------------------


def test_a_fallback_is_spent_a_failure_is_not_and_a_later_hit_is_avoided(store_url: str) -> None:
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
        assert answers[0].content == fallback.content and len(CHAT_CALLS) == 2

        with pytest.raises(RuntimeError, match="the model is down"):
            receipt_chat_model(engine, Chat(fail=True), deterministic=True).invoke("other")
        assert receipt_chat_model(engine, Chat(fail=True), deterministic=True).invoke("hi").content \
            == fallback.content  # served from the owner's receipt
        row = engine.summary()["tools"]["model:fake-1"]
    assert (row["calls"], row["executed"], row["fallbacks"], row["failures"], row["cache_hits"]) \
        == (4, 1, 1, 1, 1)
    assert (row["tokens_in"], row["tokens_out"], row["tokens_in_saved"], row["tokens_out_saved"]) \
        == (200, 40, 100, 20)
    one_turn = (100 * 2.0 + 20 * 8.0) / 1e6
    assert row["dollars_spent"] == pytest.approx(2 * one_turn)
    assert row["dollars_saved"] == pytest.approx(one_turn)
