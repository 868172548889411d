"""A wrapped chat model's with_structured_output and bind_tools are the inner model's own
(LangChain dispatches them on the model's class), and the turns of what they build still go
through receipts: recorded once, shared, replayed by another engine."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph")

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableLambda
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from singleflight_agents import Singleflight
from singleflight_agents.adapters import receipt_chat_model

CALLS: list[dict[str, Any]] = []
OWN: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    OWN.clear()


class Weather(BaseModel):
    temperature: float = Field(description="degrees Fahrenheit")


class OwnWays(BaseChatModel):
    """A provider-like model: its own structured output (a response format it reads itself)
    and a bind_tools that takes tools and dicts only, wrapped in a chain of its own."""

    model_name: str = "own-1"
    fail: bool = Field(False, exclude=True)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if self.fail:
            raise AssertionError("the inner model was called")
        CALLS.append(kwargs)
        if kwargs.get("response_format"):
            content = '{"temperature": 75}'
        else:
            content = "tools: " + ",".join(t["function"]["name"] for t in kwargs.get("tools", []))
        message = AIMessage(content, usage_metadata={"input_tokens": 10, "output_tokens": 2,
                                                     "total_tokens": 12})
        return ChatResult(generations=[ChatGeneration(message=message)])

    @property
    def _llm_type(self) -> str:
        return "own-ways"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any,
                   ) -> Runnable[LanguageModelInput, BaseMessage]:
        if not all(isinstance(t, dict | BaseTool) for t in tools):
            raise TypeError("Only BaseTool and dict is supported")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        # Not a plain binding of the model: a chain that ends in a step of its own.
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs) \
            | RunnableLambda(lambda message: message)

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Runnable[Any, Any]:
        OWN.append(schema.__name__)
        return self.bind(response_format=schema.__name__) \
            | RunnableLambda(lambda message: schema.model_validate_json(message.content))


@tool
def get_weather(city: str) -> str:
    """Get the weather."""
    return "sunny"


def test_with_structured_output_is_the_models_own_and_its_turns_are_receipts(
        sqlite_sf: Singleflight, db_path: Path) -> None:
    chat = receipt_chat_model(sqlite_sf, OwnWays(), deterministic=True)
    structured = chat.with_structured_output(Weather)
    assert OWN == ["Weather"]  # not LangChain's generic path through bind_tools
    assert structured.invoke("weather?") == Weather(temperature=75)
    assert structured.invoke("weather?") == Weather(temperature=75)
    assert [c.get("response_format") for c in CALLS] == ["Weather"]  # the second: a hit
    with Singleflight(db_path) as other:  # replayed by another engine, the model never called
        again = receipt_chat_model(other, OwnWays(fail=True), deterministic=True)
        assert again.with_structured_output(Weather).invoke("weather?") == Weather(temperature=75)


async def test_async_structured_output_shares_the_sync_turn(sqlite_sf: Singleflight) -> None:
    chat = receipt_chat_model(sqlite_sf, OwnWays(), deterministic=True)
    assert chat.with_structured_output(Weather).invoke("w") == Weather(temperature=75)
    assert await chat.with_structured_output(Weather).ainvoke("w") == Weather(temperature=75)
    assert len(CALLS) == 1


def test_bind_tools_that_is_not_a_plain_binding_still_goes_through_receipts(
        sqlite_sf: Singleflight) -> None:
    chat = receipt_chat_model(sqlite_sf, OwnWays(), deterministic=True)
    bound = chat.bind_tools([get_weather])
    assert not isinstance(bound, RunnableBinding)  # the model's own chain
    assert [bound.invoke("hi").content for _ in range(2)] == ["tools: get_weather"] * 2
    assert len(CALLS) == 1
    with pytest.raises(TypeError, match="Only BaseTool and dict"):  # the model's own rules
        chat.bind_tools([Weather])


def test_a_plain_binding_still_binds_the_wrapper(sqlite_sf: Singleflight) -> None:
    class Plain(OwnWays):
        def bind_tools(self, tools: Sequence[Any], **kwargs: Any,
                       ) -> Runnable[LanguageModelInput, BaseMessage]:
            return self.bind(tools=[convert_to_openai_tool(t) for t in tools])

    chat = receipt_chat_model(sqlite_sf, Plain(), deterministic=True)
    bound = chat.bind_tools([get_weather])
    assert isinstance(bound, RunnableBinding) and bound.bound is chat


def test_a_generic_with_structured_output_uses_the_wrapper(sqlite_sf: Singleflight) -> None:
    class Generic(OwnWays):
        def bind_tools(self, tools: Sequence[Any], **kwargs: Any,
                       ) -> Runnable[LanguageModelInput, BaseMessage]:
            return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

        def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                      run_manager: Any = None, **kwargs: Any) -> ChatResult:
            CALLS.append(kwargs)
            call = {"name": "Weather", "args": {"temperature": 60}, "id": "c1",
                    "type": "tool_call"}
            return ChatResult(generations=[ChatGeneration(message=AIMessage(
                "", tool_calls=[call]))])

        with_structured_output = BaseChatModel.with_structured_output  # type: ignore[assignment]

    chat = receipt_chat_model(sqlite_sf, Generic(), deterministic=True)
    structured = chat.with_structured_output(Weather)
    assert [structured.invoke("w") for _ in range(2)] == [Weather(temperature=60)] * 2
    assert len(CALLS) == 1 and OWN == []


def test_create_react_agent_with_a_structured_response(sqlite_sf: Singleflight) -> None:
    from langgraph.prebuilt import create_react_agent

    chat = receipt_chat_model(sqlite_sf, OwnWays(), deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # moved to langchain.agents
        agent = create_react_agent(chat, [get_weather], response_format=Weather)
    for _ in range(2):
        result = agent.invoke({"messages": [HumanMessage("What's the weather?")]})
        assert result["structured_response"] == Weather(temperature=75)
    assert OWN == ["Weather"] * 2
    assert [sorted(c) for c in CALLS] == [["tools"], ["response_format"]]  # once each


def test_token_counts_are_the_inner_models(sqlite_sf: Singleflight) -> None:
    class Counting(OwnWays):
        def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                         tools: Sequence[Any] | None = None) -> int:
            return 7 * len(messages)

        def get_token_ids(self, text: str) -> list[int]:
            return [1] * len(text)

    chat = receipt_chat_model(sqlite_sf, Counting(), deterministic=True)
    assert chat.get_num_tokens_from_messages([HumanMessage("a"), HumanMessage("b")]) == 14
    assert chat.get_token_ids("abc") == [1, 1, 1] and chat.get_num_tokens("abcd") == 4
    assert CALLS == []
