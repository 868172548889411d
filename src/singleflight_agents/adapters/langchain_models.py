"""LangChain / LangGraph chat models whose turns are recorded, shared and replayed as receipts.

``receipt_chat_model(sf, llm, deterministic=True)`` wraps any ``BaseChatModel``; a LangGraph
agent, ``bind_tools`` and ``with_structured_output`` use the wrapper as they would the model:
the model's own ``bind_tools`` and ``with_structured_output`` build what they return (its tool
format, its structured-output method), and each turn of it still goes through receipts.

**Keyed on** everything that decides the answer: the model's ``_llm_type``,
``_identifying_params`` and its own fields (secrets as ``<secret>``, clients and fields
excluded from its data left out), the
messages (type, content, name, tool calls with their ids, ``tool_call_id``,
``additional_kwargs``, metadata), ``stop``, and the call's keywords: bound tool schemas,
``tool_choice``, ``response_format`` (a class as its JSON schema), generation parameters.
**Not keyed:** message ``id``s (LangGraph gives each message a new one every run), tool
``artifact``s (never sent to a model), callbacks, run ids and config. Tool call ids are
keyed: they are stable when the turns that made them replay.

A turn is recorded and replayed whole: ``stream()`` yields the whole message as one
``AIMessageChunk`` (with ``tool_call_chunks``); token streaming is not replayed. Callbacks
and tracing see the wrapper's run; the inner model's ``_generate`` is called directly (its
rate limiter applies, its LLM cache does not).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    message_to_dict,
    messages_from_dict,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, PrivateAttr

from ..pricing import PriceSource, PriceTable
from ._langchain_compat import agenerate, generate, identifying_params, llm_type, ls_params
from ._langchain_routed import routed_model
from ._turns import Executor, Request, Turns, jsonable, setting, usage_of

__all__ = ["ReceiptChatModel", "receipt_chat_model"]

_UNKEYED = ("id", "artifact")
# LangChain's own fields, and transport settings that change how a request travels, not its
# answer (they also differ between a laptop and CI, read from the environment).
_FRAMEWORK_FIELDS = frozenset(BaseChatModel.model_fields) - {"output_version"} | {
    "streaming", "stream_usage", "timeout", "request_timeout", "max_retries", "openai_proxy",
    "openai_organization", "organization", "http_client", "http_async_client"}
_CREDENTIAL = re.compile(r"(?i)(api[_-]?key|token|secret|password|passwd|credential|auth|cookie)")


class ReceiptChatModel(BaseChatModel):
    """A chat model whose turns go through a :class:`Singleflight` engine, one receipt per
    distinct request to ``inner``; made by :func:`receipt_chat_model`."""

    inner: BaseChatModel
    _turns: Turns = PrivateAttr()
    # (the wrapper it routes to, the copy): a copy of this wrapper builds a copy of its own.
    _routed: tuple[BaseChatModel, BaseChatModel] | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "singleflight-receipts"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return {**identifying_params(self.inner), "singleflight_tool": self._turns.options.tool_name}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return ls_params(self.inner, stop, **kwargs)  # type: ignore[no-any-return]

    def _request(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> Request:
        keyed = []
        for message in messages:
            entry = message_to_dict(message)
            entry["data"] = {k: v for k, v in entry["data"].items() if k not in _UNKEYED}
            keyed.append(jsonable(entry))
        # Keys sort in this order in stored inputs and in a replay miss's (shortened) message.
        return {"messages": keyed,
                "model": {"type": llm_type(self.inner),
                          "params": jsonable(identifying_params(self.inner)),
                          "fields": _fields(self.inner)},
                "options": _keyed({**kwargs, "stop": stop})}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        def call(request: Request) -> dict[str, Any]:
            if self.inner.rate_limiter is not None:
                self.inner.rate_limiter.acquire(blocking=True)
            return _stored(generate(self.inner, messages, stop, **kwargs))

        return _result(self._turns.run_sync(call, self._request(messages, stop, kwargs)).value)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        async def call(request: Request) -> dict[str, Any]:
            if self.inner.rate_limiter is not None:
                await self.inner.rate_limiter.aacquire(blocking=True)
            return _stored(await agenerate(self.inner, messages, stop, **kwargs))

        return _result((await self._turns.run(call, self._request(messages, stop, kwargs))).value)

    # A turn is recorded whole: only an explicit stream() goes through _stream. An invoke under
    # streaming callbacks (LangGraph's stream_mode="messages") gets the message exactly as the
    # model made it, invalid tool calls included, not a re-parse of its chunks.
    def _should_stream(self, *, async_api: bool, run_manager: Any = None, **kwargs: Any) -> bool:
        return bool(kwargs.get("stream"))

    def _should_use_protocol_streaming(self, *, async_api: bool, run_manager: Any = None,
                                       **kwargs: Any) -> bool:
        return False

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield _whole(self._generate(messages, stop, run_manager, **kwargs))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        yield _whole(await self._agenerate(messages, stop, run_manager, **kwargs))

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool], *,
                   tool_choice: str | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """The inner model's ``bind_tools`` formats the tools; its turns run this wrapper."""
        if type(self.inner).bind_tools is BaseChatModel.bind_tools:
            raise NotImplementedError(f"{type(self.inner).__name__} does not implement bind_tools, "
                                      f"so its wrapper cannot bind tools either")
        routed = self._inner_routed()
        bound = routed.bind_tools(tools, tool_choice=tool_choice, **kwargs)
        if not (isinstance(bound, RunnableBinding) and bound.bound is routed):
            return bound  # the model's own runnable, on a copy whose turns run this wrapper
        ours = self.bind(**bound.kwargs)  # a plain binding: of the wrapper itself
        return ours.with_config(bound.config) if bound.config else ours

    def with_structured_output(self, schema: dict[str, Any] | type, **kwargs: Any,
                               ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """The inner model's own ``with_structured_output`` (its method and format, when it
        has one of its own), its turns run through this wrapper."""
        if type(self.inner).with_structured_output is BaseChatModel.with_structured_output:
            return super().with_structured_output(schema, **kwargs)
        return self._inner_routed().with_structured_output(schema, **kwargs)

    # Token counts are the inner model's (trim_messages(token_counter=model) asks the model).
    def get_token_ids(self, text: str) -> list[int]:
        return self.inner.get_token_ids(text)

    def get_num_tokens(self, text: str) -> int:
        return self.inner.get_num_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[Any] | None = None) -> int:
        return self.inner.get_num_tokens_from_messages(messages, tools)

    def _inner_routed(self) -> BaseChatModel:
        if self._routed is None or self._routed[0] is not self:
            self._routed = (self, routed_model(self, self.inner))
        return self._routed[1]


def receipt_chat_model(sf: Executor, llm: BaseChatModel, /, *, model_name: str | None = None,
                       prices: PriceSource | PriceTable = None, **options: Any) -> ReceiptChatModel:
    """``llm`` with each turn run through ``sf`` (a :class:`Singleflight` or the pytest
    ``singleflight`` fixture), keyed on the request and reported as ``model:<model_name>``.

    ``deterministic=True`` records, shares and replays turns; without it (or with
    ``side_effecting=True``) the model is called every time, its tokens still counted.
    ``model_name`` defaults to the model's ``model_name`` or ``model``; ``prices`` (dollars
    per million tokens, see :class:`~singleflight_agents.pricing.PriceTable`) overrides the
    run's table. Other
    keywords are :class:`ToolExecutionOptions` fields (``ttl_seconds``, ``scope``,
    ``version``, ``redact``, ``store_inputs``, ...).
    """
    if isinstance(llm, ReceiptChatModel):  # wrapped again: the new engine and options win
        model_name, llm = model_name or llm._turns.model_name, llm.inner
    if not isinstance(llm, BaseChatModel):
        raise TypeError(f"receipt_chat_model() wraps a LangChain BaseChatModel, got "
                        f"{type(llm).__name__}; wrap the model, then bind tools to the wrapper")
    if model_name is None:
        for attribute in ("model_name", "model"):
            found = getattr(llm, attribute, None)
            if isinstance(found, str) and found:
                model_name = found
                break
    if prices is not None:
        options["prices"] = prices
    turns = Turns(sf, model_name or "", options, wrapper="receipt_chat_model", model=llm)
    wrapped = ReceiptChatModel(inner=llm, output_version=llm.output_version, profile=llm.profile)
    wrapped._turns = turns
    return wrapped


def _keyed(value: Any) -> Any:
    """``value`` for the key; a class (a ``response_format``, a schema) as its JSON schema."""
    if isinstance(value, type):  # jsonable() would name its metaclass
        name = f"{value.__module__}.{value.__qualname__}"
        try:
            return {"class": name, "schema": convert_to_openai_tool(value)}
        except (TypeError, ValueError):
            return {"class": name}
    if isinstance(value, Mapping):
        return {str(k): _keyed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_keyed(v) for v in value]
    return jsonable(value)


def _fields(model: BaseChatModel) -> dict[str, Any]:
    """The model's own settings (``stop_sequences``, ``betas``, ...): a model need not report
    them all in ``_identifying_params``. LangChain's fields (callbacks, cache, tags) and fields
    excluded from the model's data (``Field(exclude=True)``: clients) are not settings of the
    answer. Credentials are: never in the key, so never in a receipt, and a job replaying
    without the key it recorded with finds the same turns."""
    fields = type(model).model_fields
    keyed: dict[str, Any] = {}
    for name in sorted(fields):
        if name in _FRAMEWORK_FIELDS or fields[name].exclude:
            continue
        if _CREDENTIAL.search(name) or "Secret" in str(fields[name].annotation):
            keyed[name] = "<secret>"
        elif "header" in name and isinstance(value := getattr(model, name, None), Mapping):
            keyed[name] = {k: "<secret>" if _CREDENTIAL.search(str(k)) else setting(v)
                           for k, v in value.items()}
        else:
            keyed[name] = setting(getattr(model, name, None))
    return keyed


def _stored(result: ChatResult) -> dict[str, Any]:
    # Providers that return n choices attach the response's usage to each: count it once, as
    # LangChain's own usage callback does.
    usage = next((found for g in result.generations
                  if (found := getattr(g.message, "usage_metadata", None))), None) or {}
    generations = [{"message": message_to_dict(g.message), "generation_info": g.generation_info}
                   for g in result.generations]
    # The same value whether it ran here or came from a receipt: pydantic objects (a parsed
    # structured output) as their JSON; everything else as it is, for the engine's codec.
    return {"usage": usage_of(usage.get("input_tokens"), usage.get("output_tokens")),
            "generations": _storable(generations), "llm_output": _storable(result.llm_output)}


def _storable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _storable(dataclasses.asdict(value))
    if isinstance(value, tuple) and type(value) is not tuple:  # a named tuple
        return tuple(_storable(v) for v in value)
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_storable(v) for v in value)
    return value


def _whole(result: ChatResult) -> ChatGenerationChunk:
    """The turn as one chunk (with ``tool_call_chunks``), as a stream that arrived at once."""
    generation = result.generations[0]
    message = generation.message
    chunk = AIMessageChunk(**message.model_dump(exclude={"type"}))
    return ChatGenerationChunk(message=chunk, generation_info=generation.generation_info)


def _result(value: dict[str, Any]) -> ChatResult:
    # No copy needed: the engine hands each caller its own decoded value, and the messages are
    # built anew from it.
    stored = value["generations"]
    messages = messages_from_dict([g["message"] for g in stored])
    return ChatResult(generations=[ChatGeneration(message=m, generation_info=g["generation_info"])
                                   for g, m in zip(stored, messages, strict=True)],
                      llm_output=value["llm_output"])
