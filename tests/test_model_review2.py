"""Second review of the model-turn feature: regressions and new bugs of the fix commit d0e512a.

Each bug it found has a test here (all fixed); the other tests pin what was checked and holds.
No sleeps synchronise anything: tasks meet on events (``asyncio.sleep(0)`` in
a fake transport is one loop turn of simulated I/O, not a wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import re
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from agents import Model, ModelProvider, ModelSettings, ModelTracing
from agents.testing import ScriptedModel, assistant_message
from conftest import SECRET, SpyEngine
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.utils import secret_from_env
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from pydantic import ConfigDict, Field, SecretStr

from singleflight_agents import Singleflight, SingleflightError
from singleflight_agents.adapters import receipt_chat_model
from singleflight_agents.adapters._turns import _key
from singleflight_agents.adapters.openai_models import (
    IncompleteStreamError,
    receipt_model,
    receipt_model_provider,
)
from singleflight_agents.codec import canonical_json
from singleflight_agents.reporting import format_summary

NAME = "scripted"
KW: dict[str, Any] = {"previous_response_id": None, "conversation_id": None, "prompt": None}
GATE = 20.0  # bound for "the other side got there"; only a hang reaches it
KEY_ENV = "REVIEW2_OPENAI_API_KEY"


def direct_args(input: Any = "hello") -> tuple[Any, ...]:
    return ("Be brief.", input, ModelSettings(), [], None, [], ModelTracing.DISABLED)


async def live_events(text: str = "hi") -> list[Any]:
    """The events an unwrapped ScriptedModel streams for one answer."""
    model = ScriptedModel([[assistant_message(text)]])
    return [event async for event in model.stream_response(*direct_args(), **KW)]


class Streamer(Model):
    """A provider's transport stand-in: ``stream_response`` returns ``stream()`` (no tracing)."""

    def __init__(self, stream: Callable[[], AsyncIterator[Any]]) -> None:
        self.stream = stream
        self.calls = 0

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.calls += 1
        return self.stream()


async def stop_at_completed(model: Any, on_completed: Callable[[], None] = lambda: None) -> None:
    """A consumer that has all it needs at ``response.completed`` and closes the stream there."""
    async with contextlib.aclosing(model.stream_response(*direct_args(), **KW)) as stream:
        async for event in stream:
            if event.type == "response.completed":
                on_completed()
                break


# -- LangChain stand-ins -------------------------------------------------------------------------

CALLS: list[list[BaseMessage]] = []


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


def _usage(tokens_in: int = 100, tokens_out: int = 20) -> dict[str, int]:
    return {"input_tokens": tokens_in, "output_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}


class Finish(enum.StrEnum):
    STOP = "stop"


class Echo(BaseChatModel):
    """Answers with the call count; ``finish`` (a test knob) goes into ``response_metadata``."""

    model_name: str = "echo-1"
    finish: Any = Field(None, exclude=True)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        CALLS.append(messages)
        metadata = {} if self.finish is None else {"finish": self.finish}
        message = AIMessage(content=f"answer {len(CALLS)}", usage_metadata=_usage(),  # type: ignore[arg-type]
                            response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    @property
    def _llm_type(self) -> str:
        return "review2-echo"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}


class OpenAILike(Echo):
    """The fields of langchain-openai's ``BaseChatOpenAI`` that matter here: clients excluded
    from the model's data, the API key a ``SecretStr`` read from the environment (``None`` when
    unset: the client then fails only when called), default headers, timeout and retries."""

    model_config = ConfigDict(populate_by_name=True)

    client: Any = Field(default=None, exclude=True)
    model_name: str = Field(default="gpt-4.1-mini", alias="model")
    openai_api_key: SecretStr | None = Field(alias="api_key",
                                             default_factory=secret_from_env(KEY_ENV, default=None))
    default_headers: Mapping[str, str] | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    request_timeout: Any = Field(default=None, alias="timeout")
    max_retries: int | None = None

    @property
    def _llm_type(self) -> str:
        return "review2-openai-like"


class LiteLLMLike(Echo):
    """Community integrations (ChatLiteLLM, ...) keep provider API keys as plain ``str`` fields."""

    openai_api_key: str | None = None


class BanWords:
    """A logits processor: a callable object a local model's generation settings may hold."""

    def __call__(self, scores: list[float]) -> list[float]:
        return scores


class Local(Echo):
    """A local model: its generation settings (a dict holding a processor object) are a field
    that ``_identifying_params`` does not report; the answer depends on ``top_k``."""

    generation: dict[str, Any] = Field(default_factory=dict)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        CALLS.append(messages)
        message = AIMessage(content=f"top_k={self.generation['top_k']}")
        return ChatResult(generations=[ChatGeneration(message=message)])


class ToolCalls(Echo):
    """A model that does not stream natively and answers with one valid tool call and one whose
    arguments were cut off (an invalid tool call, as LangChain's providers build them)."""

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        CALLS.append(messages)
        valid = {"name": "weather", "args": {"city": "Oslo"}, "id": "c1"}
        cut_off = {"name": "weather", "args": '{"city": "Berg', "id": "c2", "error": "Unterminated string",
                   "type": "invalid_tool_call"}
        message = AIMessage(content="", tool_calls=[valid], invalid_tool_calls=[cut_off])
        return ChatResult(generations=[ChatGeneration(message=message)])


def receipts(engine: Singleflight) -> list[Any]:
    return list(engine.store.iter_receipts())


# == confirmed bugs ================================================================================

# -- stream_response: the turn left to finish in the background --------------------------------------


def test_a_turn_left_finishing_when_asyncio_run_ends_is_still_recorded(tmp_path: Path) -> None:
    events = asyncio.run(live_events())
    with Singleflight(tmp_path / "receipts.db", secret=SECRET) as engine:

        async def main() -> None:
            closed = asyncio.Event()

            async def transport() -> AsyncIterator[Any]:
                for event in events:
                    yield event
                await closed.wait()  # the server closes the connection after the terminal event,
                await asyncio.sleep(0)  # and its EOF is read one loop turn later

            model = receipt_model(engine, Streamer(transport), model_name=NAME, deterministic=True)
            await stop_at_completed(model, closed.set)

        asyncio.run(main())  # a script whose last step is the streamed turn
        assert len(receipts(engine)) == 1


def test_a_turn_left_finishing_on_a_closed_loop_does_not_keep_its_lease(tmp_path: Path) -> None:
    events = asyncio.run(live_events())
    options: dict[str, Any] = {"model_name": NAME, "deterministic": True, "lease_seconds": 30.0,
                               "wait_timeout_seconds": 0.5}

    async def transport() -> AsyncIterator[Any]:
        for event in events:
            yield event
        await asyncio.Event().wait()  # closes later: the loop is gone by then

    async def complete() -> AsyncIterator[Any]:
        for event in events:
            yield event

    engine = Singleflight(tmp_path / "receipts.db", secret=SECRET)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(stop_at_completed(receipt_model(engine, Streamer(transport), **options)))
    finally:
        loop.close()
    try:
        async def again() -> list[str]:
            model = receipt_model(engine, Streamer(complete), **options)
            return [event.type async for event in model.stream_response(*direct_args(), **KW)]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert asyncio.run(again())[-1] == "response.completed"
        assert [str(w.message) for w in caught if "timed out" in str(w.message)] == []
    finally:
        engine.close()


async def test_a_consumer_cancelled_while_its_abandoned_turn_winds_down_stays_cancelled(
        sqlite_sf: Singleflight) -> None:
    events = await live_events()
    cleaning, cleaned = asyncio.Event(), asyncio.Event()

    async def transport() -> AsyncIterator[Any]:
        yield events[0]
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await cleaned.wait()  # closing the connection takes a moment
            raise

    model = receipt_model(sqlite_sf, Streamer(transport), model_name=NAME, deterministic=True)

    async def consume() -> str:
        async with contextlib.aclosing(model.stream_response(*direct_args(), **KW)) as stream:
            async for _ in stream:
                break  # stops at response.created: the turn is cancelled
        return "carried on"

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(cleaning.wait(), GATE)
    task.cancel()  # e.g. a timeout or a TaskGroup, while the finally block awaits the turn
    cleaned.set()
    await asyncio.wait({task}, timeout=GATE)
    assert task.cancelled(), task.result()


# -- conversation_id turns --------------------------------------------------------------------------


async def test_replay_mode_never_calls_the_model_for_a_conversation_turn(db_path: Path) -> None:
    inner = ScriptedModel([[assistant_message("a live answer")]])
    with Singleflight(db_path, mode="replay") as replayer:
        model = receipt_model(replayer, inner, model_name=NAME, deterministic=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(SingleflightError, match="conversation_id cannot be replayed"):
                await model.get_response(*direct_args(), **{**KW, "conversation_id": "conv_1"})
    assert len(inner.calls) == 0


async def test_a_side_effecting_model_is_not_told_to_give_key_for_conversation_turns(
        sqlite_sf: Singleflight) -> None:
    model = receipt_model(sqlite_sf, ScriptedModel([[assistant_message("x")]]), model_name=NAME,
                          side_effecting=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await model.get_response(*direct_args(), **{**KW, "conversation_id": "conv_1"})
    assert [str(w.message) for w in caught if "conversation_id" in str(w.message)] == []


# -- LangChain: the new _stream and _whole ------------------------------------------------------


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def last_message_streaming(model: BaseChatModel) -> AIMessage:
    """One agent step in a LangGraph graph streamed with stream_mode="messages" (token streaming to
    a UI or an eval log), which attaches a streaming callback handler to the model's run."""
    graph = StateGraph(State)
    graph.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_edge(START, "agent")
    graph.add_edge("agent", END)
    final: dict[str, Any] = {}
    for mode, chunk in graph.compile().stream({"messages": [HumanMessage("Weather?")]},
                                              stream_mode=["messages", "values"]):
        if mode == "values":
            final = chunk
    message = final["messages"][-1]
    assert isinstance(message, AIMessage)
    return message


def test_langgraph_messages_streaming_keeps_invalid_tool_calls_invalid(sf: Singleflight) -> None:
    unwrapped = last_message_streaming(ToolCalls())
    assert [call["args"] for call in unwrapped.invalid_tool_calls] == ['{"city": "Berg']
    wrapped = last_message_streaming(receipt_chat_model(sf, ToolCalls(), deterministic=True))
    assert wrapped.tool_calls == unwrapped.tool_calls
    assert wrapped.invalid_tool_calls == unwrapped.invalid_tool_calls


# -- LangChain: model fields in the key -----------------------------------------------------------


def test_turns_recorded_with_an_api_key_replay_without_one(
        sf: Singleflight, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-recording-key")
    recorded = receipt_chat_model(sf, OpenAILike(), deterministic=True).invoke("hi")
    monkeypatch.delenv(KEY_ENV)  # CI: no key, receipts only
    with Singleflight(store=store_url, secret=SECRET, mode="replay") as replayer:
        replayed = receipt_chat_model(replayer, OpenAILike(), deterministic=True).invoke("hi")
    assert replayed.content == recorded.content and len(CALLS) == 1


@pytest.mark.parametrize("llm", [
    OpenAILike(api_key="sk-x", default_headers={"Authorization": "Bearer sk-gateway-0123456789abcdef"}),
    LiteLLMLike(openai_api_key="sk-gateway-0123456789abcdef"),
], ids=["default_headers", "str_api_key"])
def test_a_credential_in_a_model_field_never_reaches_the_store(sf: Singleflight, llm: Echo) -> None:
    receipt_chat_model(sf, llm, deterministic=True).invoke("hi")
    assert [r.tool_name for r in receipts(sf) if "sk-gateway-0123456789abcdef" in (r.inputs or "")] == []


def test_settings_holding_one_unencodable_object_still_key_their_other_values(sf: Singleflight) -> None:
    greedy = receipt_chat_model(sf, Local(generation={"top_k": 1, "processor": BanWords()}),
                                deterministic=True)
    wide = receipt_chat_model(sf, Local(generation={"top_k": 40, "processor": BanWords()}),
                              deterministic=True)
    assert greedy.invoke("hi").content == "top_k=1"
    assert wide.invoke("hi").content == "top_k=40"


def test_an_enum_in_response_metadata_is_still_recorded(sf: Singleflight) -> None:
    chat = receipt_chat_model(sf, Echo(finish=Finish.STOP), deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first, second = chat.invoke("hi"), chat.invoke("hi")
    assert len(CALLS) == 1 and first.content == second.content


def test_rewrapping_a_wrapped_chat_model_wraps_the_original(sf: Singleflight) -> None:
    original = Echo()
    once = receipt_chat_model(sf, original, deterministic=True)
    twice = receipt_chat_model(sf, once, deterministic=True, ttl_seconds=60)
    assert twice.inner is original


class WrappingProvider(ModelProvider):
    """A provider whose models are already wrapped (another team's receipt_model_provider)."""

    def __init__(self, engine: Singleflight) -> None:
        self.engine = engine

    def get_model(self, model_name: str | None) -> Model:
        inner = ScriptedModel([[assistant_message("x")]])
        return receipt_model(self.engine, inner, model_name=NAME, deterministic=True)


async def test_a_provider_rewraps_an_already_wrapped_model_with_its_own_engine(tmp_path: Path) -> None:
    with Singleflight(tmp_path / "a.db", secret=SECRET) as old, \
            Singleflight(tmp_path / "b.db", secret=SECRET) as new:
        model = receipt_model_provider(new, WrappingProvider(old), deterministic=True).get_model(NAME)
        await model.get_response(*direct_args(), **KW)
        assert f"model:{NAME}" in new.summary()["tools"]


# -- the report -----------------------------------------------------------------------------------


def test_a_cheap_model_turn_is_not_reported_as_zero_dollars(store_url: str) -> None:
    prices = {"echo-1": {"input": 0.10, "output": 0.40}}
    with Singleflight(store=store_url, secret=SECRET, prices=prices) as engine:
        chat = receipt_chat_model(engine, Echo(), deterministic=True)
        chat.invoke("hi")
        chat.invoke("hi")
        summary = engine.summary()
    assert summary["tools"]["model:echo-1"]["dollars_saved"] == pytest.approx(1.8e-5)
    text = format_summary(summary)
    assert "$0.000018" in text and "0.000018  " in text  # headline and the tool's row
    assert not re.search(r"\$0\.0+(?![0-9])", text), text  # nothing avoided shows as zero


# == checked and fine ===============================================================================


async def test_a_background_turn_that_fails_after_completed_is_quiet_and_not_kept(
        sqlite_sf: Singleflight) -> None:
    """The turn is recorded at response.completed and the transport closed there: its later
    error never surfaces (no 'Task exception was never retrieved'), nothing is left running."""
    events = await live_events()
    closed = asyncio.Event()

    async def transport() -> AsyncIterator[Any]:
        for event in events:
            yield event
        await closed.wait()
        raise ConnectionError("reset after the terminal event")

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        model = receipt_model(sqlite_sf, Streamer(transport), model_name=NAME, deterministic=True)
        await stop_at_completed(model)
        closed.set()
        gc.collect()
        assert reported == []
        assert sqlite_sf.summary()["tools"][f"model:{NAME}"]["executed"] == 1
    finally:
        loop.set_exception_handler(previous)


async def test_an_incomplete_stream_reaches_the_owner_after_its_events_and_an_in_flight_waiter(
        tmp_path: Path) -> None:
    events = await live_events()
    release = asyncio.Event()

    async def cut_off() -> AsyncIterator[Any]:
        yield events[0]
        await release.wait()  # the stream then ends without response.completed

    spy = SpyEngine(tmp_path / "receipts.db", secret=SECRET)
    try:
        owner_inner, waiter_inner = Streamer(cut_off), Streamer(cut_off)
        owner = receipt_model(spy, owner_inner, model_name=NAME, deterministic=True)
        waiter = receipt_model(spy, waiter_inner, model_name=NAME, deterministic=True)
        received: list[str] = []

        async def consume_owner() -> None:
            async for event in owner.stream_response(*direct_args(), **KW):
                received.append(event.type)

        async def consume_waiter() -> list[str]:
            return [event.type async for event in waiter.stream_response(*direct_args(), **KW)]

        owned = asyncio.ensure_future(consume_owner())
        await asyncio.wait_for(spy.reached(1).wait(), GATE)
        waiting = asyncio.ensure_future(consume_waiter())
        await asyncio.wait_for(spy.reached(2).wait(), GATE)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(owned, waiting, return_exceptions=True), GATE)
        assert [type(r) for r in results] == [IncompleteStreamError] * 2
        assert received == ["response.created"]
        assert (owner_inner.calls, waiter_inner.calls) == (1, 0)
        assert receipts(spy) == []
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()] == []
    finally:
        spy.close()


def test_keys_normalise_json_numbers_only() -> None:
    def keyed(request: Any, stream: bool = False, user: Any = None) -> str:
        return canonical_json(_key(user)(None, request, stream))

    assert keyed({"t": 1.0}) == keyed({"t": 1})
    assert keyed({"t": True}) != keyed({"t": 1})
    assert keyed({"t": "1"}) != keyed({"t": 1})
    assert keyed({"t": 1.5}) != keyed({"t": 1})
    assert keyed({"t": [1.0, (2.0, {"x": -0.0})]}) == keyed({"t": [1, [2, {"x": 0}]]})
    assert keyed({"t": 1}) != keyed({"t": 1}, stream=True)
    assert keyed({"a": "x"}, user=lambda r: (r["a"], 1.0)) == canonical_json({"request": ["x", 1]})


def test_a_chat_openai_like_model_keys_its_api_key_as_a_secret_and_its_client_not_at_all(
        sf: Singleflight) -> None:
    first = OpenAILike(api_key="sk-first-0123456789", client=object(), timeout=30.0)
    rotated = OpenAILike(api_key="sk-rotated-9876543210", client=object(), timeout=30.0)
    assert receipt_chat_model(sf, first, deterministic=True).invoke("hi").content == "answer 1"
    assert receipt_chat_model(sf, rotated, deterministic=True).invoke("hi").content == "answer 1"
    stored = "".join(r.inputs or "" for r in receipts(sf))
    assert "sk-first" not in stored and "<secret>" in stored and '"client"' not in stored


def test_a_wrapped_model_streams_one_whole_chunk_with_its_tool_calls(sf: Singleflight) -> None:
    chunks = list(receipt_chat_model(sf, ToolCalls(), deterministic=True).stream("Weather?"))
    assert chunks[0].tool_calls == [{"name": "weather", "args": {"city": "Oslo"}, "id": "c1",
                                     "type": "tool_call"}]
    assert [call["args"] for call in chunks[0].invalid_tool_calls] == ['{"city": "Berg']
