"""Fake models and helpers shared by the model-turn tests (``test_model_*.py``).

Agents SDK: the two-turn weather agent (turn 1 calls ``lookup``, turn 2 answers), calls of the
``Model`` interface made directly (``direct_args``, ``KW``), the events an unwrapped
``ScriptedModel`` streams, and ``Streamer``, a bare transport stand-in.

LangChain: chat model stand-ins. Each real call of one of them is appended to ``CHAT_CALLS``;
a test that counts calls, or reads the numbered answers of ``Echo``, takes the ``chat_calls``
fixture (conftest.py), which empties it first.

No sleeps synchronise anything: tasks and threads meet on events, bounded by ``GATE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from agents import Model, ModelSettings, ModelTracing, RunConfig, Usage, function_tool
from agents.testing import ModelCall, ScriptedModel, assistant_message, function_call
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.utils import secret_from_env
from pydantic import ConfigDict, Field, SecretStr

from singleflight_agents import Singleflight

GATE = 20.0  # bound for "the other side got there"; only a hang reaches it

# == the Agents SDK ================================================================================

CONFIG = RunConfig(tracing_disabled=True)
NAME = "scripted"
TOOL = f"model:{NAME}"
QUESTION = "What is the weather in Oslo?"
INSTRUCTIONS = "Answer in one sentence."
FINAL = "It is sunny in Oslo."
USAGE = Usage(requests=1, input_tokens=1000, output_tokens=200, total_tokens=1200)
TURN_DOLLARS = (1000 * 2.0 + 200 * 8.0) / 1e6  # one USAGE turn at $2 / $8 per million tokens


@function_tool
def lookup(city: str) -> str:
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    return f"sunny in {city}"


def turn_one() -> list[Any]:
    return [function_call("lookup", {"city": "Oslo"}, call_id="call-1")]


def turn_two() -> list[Any]:
    return [assistant_message(FINAL)]


def is_turn_two(call: ModelCall) -> bool:
    """Whether the request already carries the tool's output (the agent's second turn)."""
    return isinstance(call.input, list) and any(
        isinstance(item, dict) and item.get("type") == "function_call_output" for item in call.input)


def answer(call: ModelCall) -> list[Any]:
    """By the request, not by position: when runs share turns, a model may be asked turn 2 first."""
    return turn_two() if is_turn_two(call) else turn_one()


# -- direct calls of the Model interface -------------------------------------------------------

KW: dict[str, Any] = {"previous_response_id": None, "conversation_id": None, "prompt": None}


def direct_args(*, instructions: str = "Be brief.", input: Any = "hello",
                settings: ModelSettings | None = None, tools: list[Any] | None = None,
                tracing: ModelTracing = ModelTracing.DISABLED) -> tuple[Any, ...]:
    return (instructions, input, settings or ModelSettings(), tools or [], None, [], tracing)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


async def live_events(output: list[Any]) -> list[Any]:
    """The events an unwrapped ScriptedModel streams for ``output``."""
    return await collect(ScriptedModel([output]).stream_response(*direct_args(), **KW))


def text_of(response: Any) -> str:
    return str(response.output[0].content[0].text)


def hung_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of this loop still pending and not on their way out (not being cancelled)."""
    return [task for task in asyncio.all_tasks()
            if task is not asyncio.current_task() and not task.done() and not task.cancelling()]


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


def receipts(engine: Singleflight) -> list[Any]:
    return list(engine.store.iter_receipts())


# == LangChain =====================================================================================

CHAT_CALLS: list[list[BaseMessage]] = []  # the messages of every real call, in order
KEY_ENV = "FAKE_MODELS_OPENAI_API_KEY"  # where OpenAILike reads its API key from


def chat_usage(tokens_in: int = 100, tokens_out: int = 20) -> dict[str, int]:
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
            content=text, usage_metadata=chat_usage(),  # type: ignore[arg-type]
            response_metadata={"model_name": self.model_name, **(self.metadata_extra or {})}))
            for _ in range(self.choices)]
        return ChatResult(generations=generations)

    @property
    def _llm_type(self) -> str:
        return "stand-in-chat"

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


class Finish(enum.StrEnum):
    STOP = "stop"


class Echo(BaseChatModel):
    """Answers with the number of calls so far (``answer 1``, ...: a fresh answer shows a real
    call); ``finish`` (a test knob) goes into ``response_metadata``."""

    model_name: str = "echo-1"
    finish: Any = Field(None, exclude=True)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        CHAT_CALLS.append(messages)
        metadata = {} if self.finish is None else {"finish": self.finish}
        message = AIMessage(content=f"answer {len(CHAT_CALLS)}", usage_metadata=chat_usage(),  # type: ignore[arg-type]
                            response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    @property
    def _llm_type(self) -> str:
        return "stand-in-echo"

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
        return "stand-in-openai-like"


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
        CHAT_CALLS.append(messages)
        message = AIMessage(content=f"top_k={self.generation['top_k']}")
        return ChatResult(generations=[ChatGeneration(message=message)])


class ToolCalls(Echo):
    """A model that does not stream natively and answers with one valid tool call and one whose
    arguments were cut off (an invalid tool call, as LangChain's providers build them)."""

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        CHAT_CALLS.append(messages)
        valid = {"name": "weather", "args": {"city": "Oslo"}, "id": "c1"}
        cut_off = {"name": "weather", "args": '{"city": "Berg', "id": "c2", "error": "Unterminated string",
                   "type": "invalid_tool_call"}
        message = AIMessage(content="", tool_calls=[valid], invalid_tool_calls=[cut_off])
        return ChatResult(generations=[ChatGeneration(message=message)])
