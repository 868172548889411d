"""OpenAI Agents SDK adapter for model turns: ``receipt_model`` and ``receipt_model_provider``.

A wrapped ``agents.Model`` sends each turn through the engine under the tool name
``model:<name>``. The key is everything that decides the answer: the model name, system
instructions, input items, model settings (all of them, ``extra_headers`` included), the
tools' and handoffs' schemas (all the SDK sends of a function tool; hosted tools by their
configuration), the output schema, ``previous_response_id`` and ``prompt``. Never keyed: the
tracing setting, the Python objects behind tools and handoffs, trace, span and request ids.
A turn with a ``conversation_id`` depends on server-side state and is not shared (unless
``key=`` says how). The receipt is the SDK's ``ModelResponse``: output items, usage, response
and request ids, raw usage.

``stream_response`` records and replays too. The first caller of a turn streams live while
its events are recorded; callers that share the turn in flight, or find it in the store,
get the recorded events in order, from ``response.created`` to ``response.completed``. A
stream and a non-streamed turn with the same request are separate receipts; a stream that
never reached ``response.completed`` is not recorded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import warnings
from collections.abc import AsyncIterator
from functools import cache
from typing import Any, TypedDict

from agents import FunctionTool, Handoff, Model, ModelProvider, ModelResponse, ModelSettings, ModelTracing
from agents.agent_output import AgentOutputSchemaBase
from agents.items import TResponseInputItem, TResponseOutputItem, TResponseStreamEvent
from agents.retry import ModelRetryAdvice, ModelRetryAdviceRequest
from agents.tool import Tool
from agents.usage import deserialize_usage, serialize_usage
from openai.types.responses.response_prompt_param import ResponsePromptParam
from pydantic import TypeAdapter

from ..models import SingleflightError
from ._agents_compat import run_end_cleanup, tool_namespace
from ._turns import Executor, Request, Turns, jsonable, setting, usage_of

__all__ = ["IncompleteStreamError", "ReceiptModel", "ReceiptModelProvider", "receipt_model",
           "receipt_model_provider"]


class _Ids(TypedDict):
    """The keyword arguments of ``Model.get_response`` and ``Model.stream_response``."""

    previous_response_id: str | None
    conversation_id: str | None
    prompt: ResponsePromptParam | None


class IncompleteStreamError(RuntimeError):
    """A model's stream ended without ``response.completed``: it is not recorded."""


def receipt_model(sf: Executor, model: Model, /, *, model_name: str | None = None,
                  prices: Any = None, **options: Any) -> ReceiptModel:
    """``model`` with its turns recorded, shared in flight and replayed through ``sf``.

    ``sf`` is a :class:`~singleflight_agents.Singleflight` or the pytest ``singleflight``
    fixture (whose marker then applies); the run's session decides the mode. Turns are
    shared only with an explicit ``deterministic=True``; otherwise the model is called every
    time.
    ``model_name`` names the model in keys, reports and the price table (default: the
    model's ``model`` attribute). ``prices`` overrides the engine's price table. Other
    keywords are :class:`~singleflight_agents.ToolExecutionOptions` fields; ``key=``
    receives the request dict.
    """
    if not isinstance(model, Model):
        raise TypeError(f"receipt_model() expected an agents.Model, got {type(model).__name__}")
    if isinstance(model, ReceiptModel):  # wrapped again: the new engine and options win
        model_name, model = model_name or model.model, model.inner
    name = model_name or _name_of(model)
    extra = {} if prices is None else {"prices": prices}
    return ReceiptModel(model, Turns(sf, name, {**options, **extra}, wrapper="receipt_model",
                                     model=model))


def receipt_model_provider(sf: Executor, provider: ModelProvider, /, *, prices: Any = None,
                           **options: Any) -> ReceiptModelProvider:
    """``provider`` whose models are wrapped by :func:`receipt_model`, for
    ``RunConfig(model_provider=...)``: it covers every agent whose model is given by name
    (an agent holding a ``Model`` object needs :func:`receipt_model` itself)."""
    if not isinstance(provider, ModelProvider):
        raise TypeError(f"receipt_model_provider() expected an agents.ModelProvider, got "
                        f"{type(provider).__name__}")
    extra = {} if prices is None else {"prices": prices}
    options = {**options, **extra}
    Turns(sf, "probe", options, wrapper="receipt_model_provider", model=provider)  # fail now
    return ReceiptModelProvider(sf, provider, options)


class ReceiptModel(Model):
    """An ``agents.Model`` whose turns go through the engine; see :func:`receipt_model`."""

    def __init__(self, inner: Model, turns: Turns) -> None:
        self.inner = inner
        self.model = turns.model_name
        self._turns = turns
        self._warned_conversation = False

    async def get_response(
        self, system_instructions: str | None, input: str | list[TResponseInputItem],
        model_settings: ModelSettings, tools: list[Tool], output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff], tracing: ModelTracing, *, previous_response_id: str | None,
        conversation_id: str | None, prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        args = (system_instructions, input, model_settings, tools, output_schema, handoffs, tracing)
        ids: _Ids = {"previous_response_id": previous_response_id,
                     "conversation_id": conversation_id, "prompt": prompt}

        async def call(request: Request) -> dict[str, Any]:
            return _dump_response(await self.inner.get_response(*args, **ids))

        request = self._request(*args, **ids)
        outcome = await self._turns.run(call, request, shared=self._shareable(conversation_id))
        return _load_response(outcome.value)

    async def stream_response(
        self, system_instructions: str | None, input: str | list[TResponseInputItem],
        model_settings: ModelSettings, tools: list[Tool], output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff], tracing: ModelTracing, *, previous_response_id: str | None,
        conversation_id: str | None, prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        args = (system_instructions, input, model_settings, tools, output_schema, handoffs, tracing)
        ids: _Ids = {"previous_response_id": previous_response_id,
                     "conversation_id": conversation_id, "prompt": prompt}
        request = self._request(*args, **ids)
        # The engine runs `record` in this task's loop if this caller owns the turn; its events
        # reach this generator through the queue as they arrive. Otherwise `record` never runs
        # here and the outcome carries the recorded events.
        queue: asyncio.Queue[TResponseStreamEvent] = asyncio.Queue()
        ran_here = False

        async def record(request: Request) -> dict[str, Any]:
            nonlocal ran_here
            ran_here = True
            events, usage, completed = [], usage_of(0, 0), False
            stream = self.inner.stream_response(*args, **ids)
            try:
                async for event in stream:
                    queue.put_nowait(event)
                    events.append(_dump(event))
                    response = getattr(event, "response", None)
                    if event.type == "response.completed" and response is not None:
                        completed = True
                        if response.usage:
                            usage = usage_of(response.usage.input_tokens, response.usage.output_tokens)
                        break  # the answer is whole: record it now, whatever the stream does next
            finally:
                close = getattr(stream, "aclose", None)
                if close is not None:
                    await close()
            if not completed:  # a failed or cut-off stream is never a receipt
                last = events[-1]["type"] if events else "no event"
                raise IncompleteStreamError(f"{self._turns.options.tool_name}: the stream ended "
                                            f"without response.completed (last: {last}); not "
                                            f"recorded")
            return {"usage": usage, "events": events}

        turn = asyncio.ensure_future(
            self._turns.run(record, request, stream=True, shared=self._shareable(conversation_id)))
        waiter: asyncio.Future[TResponseStreamEvent] | None = None
        delivered_completed = False
        try:
            while not turn.done() or not queue.empty():
                if queue.empty():
                    waiter = asyncio.ensure_future(queue.get())
                    await asyncio.wait({waiter, turn}, return_when=asyncio.FIRST_COMPLETED)
                    if not waiter.done():
                        waiter.cancel()
                        continue
                    event = waiter.result()
                else:
                    event = queue.get_nowait()
                delivered_completed = event.type == "response.completed"
                yield event
            outcome = turn.result()  # raises the turn's error after the events it streamed
            if not ran_here:
                adapter = _stream_event_adapter()
                for event in outcome.value["events"]:
                    yield adapter.validate_python(event)
        finally:
            if waiter is not None:
                waiter.cancel()  # cancelled while waiting for the next event
            if not turn.done():
                # Stopped after the whole answer: the turn is only storing it, so wait for that.
                # Stopped before: the turn is cancelled and the engine abandons it.
                if not delivered_completed:
                    turn.cancel()
                await asyncio.wait({turn})  # a cancellation of this consumer still propagates
            if not turn.cancelled():
                turn.exception()  # retrieved: the consumer has gone

    def _shareable(self, conversation_id: str | None) -> bool:
        """A turn in a server-side conversation depends on what the server holds, which the
        request does not carry: shared only under a ``key=`` of the user's, and never replayed
        without one."""
        options = self._turns.options
        if conversation_id is None or self._turns.user_key is not None or not options.shared:
            return True
        if self._turns.engine.current_mode() == "replay":
            raise SingleflightError(
                f"{options.tool_name}: a turn with a conversation_id cannot be replayed: it depends "
                f"on the conversation the server holds; give key= to record such turns, or run "
                f"this eval without replay mode")
        if not self._warned_conversation:
            self._warned_conversation = True
            warnings.warn(f"{options.tool_name}: turns with a conversation_id depend on the "
                          f"conversation the server holds, so they are not shared or recorded; "
                          f"give key= to share them anyway", RuntimeWarning, stacklevel=3)
        return False

    def _request(self, system_instructions: str | None, input: str | list[TResponseInputItem],
                 model_settings: ModelSettings, tools: list[Tool],
                 output_schema: AgentOutputSchemaBase | None, handoffs: list[Handoff],
                 tracing: ModelTracing, *, previous_response_id: str | None,
                 conversation_id: str | None, prompt: ResponsePromptParam | None) -> Request:
        """What decides the answer; ``tracing`` never does."""
        return {
            "model": self.model,
            "system_instructions": system_instructions,
            "input": jsonable(input),
            "model_settings": model_settings.to_json_dict(),
            "tools": [_tool_spec(tool) for tool in tools],
            "handoffs": [_handoff_spec(handoff) for handoff in handoffs],
            "output_schema": _output_spec(output_schema),
            "previous_response_id": previous_response_id,
            "conversation_id": conversation_id,
            "prompt": jsonable(prompt),
        }

    async def close(self) -> None:
        await self.inner.close()

    async def _cleanup_on_run_end(self, owner: object) -> None:
        await run_end_cleanup(self.inner, owner)

    def get_retry_advice(self, request: ModelRetryAdviceRequest) -> ModelRetryAdvice | None:
        return self.inner.get_retry_advice(request)


class ReceiptModelProvider(ModelProvider):
    """A ``ModelProvider`` whose models are :class:`ReceiptModel`\\ s; see
    :func:`receipt_model_provider`."""

    def __init__(self, sf: Executor, provider: ModelProvider, options: dict[str, Any]) -> None:
        self.inner = provider
        self._sf = sf
        self._options = options

    def get_model(self, model_name: str | None) -> Model:
        model = self.inner.get_model(model_name)
        if isinstance(model, ReceiptModel):  # this provider's engine and options win
            model_name, model = model.model, model.inner
        name = _name_of(model, default=model_name)
        return ReceiptModel(model, Turns(self._sf, name, self._options,
                                         wrapper="receipt_model_provider", model=model))

    async def aclose(self) -> None:
        await self.inner.aclose()


def _name_of(model: Model, default: str | None = None) -> str:
    name = getattr(model, "model", None)
    if isinstance(name, str) and name:
        return name
    if default:
        return default
    raise TypeError(f"receipt_model() needs model_name= for a {type(model).__name__}, which has "
                    f"no `model` name to key, report and price its turns by")


def _tool_spec(tool: Tool) -> Any:
    """What the model is told about a tool: function tools by schema, hosted tools by their
    configuration (callables and client objects left out)."""
    if isinstance(tool, FunctionTool):
        # What OpenAIResponsesModel sends for a function tool (openai-agents 0.24), namespace
        # from `agents.tool_namespace` included.
        return {"type": "function", "name": tool.name, "description": tool.description,
                "parameters": tool.params_json_schema, "strict": tool.strict_json_schema,
                "defer_loading": tool.defer_loading, "allowed_callers": jsonable(tool.allowed_callers),
                "output_schema": tool.output_json_schema,
                **tool_namespace(tool)}
    spec: dict[str, Any] = {"type": type(tool).__name__}
    if dataclasses.is_dataclass(tool):
        for field in dataclasses.fields(tool):
            value = getattr(tool, field.name)
            if not callable(value):
                spec[field.name] = setting(value)
    computer = getattr(tool, "computer", None)
    if computer is not None:  # what the SDK tells the model about the screen
        spec["computer"] = {"environment": setting(getattr(computer, "environment", None)),
                            "dimensions": setting(getattr(computer, "dimensions", None))}
    spec["name"] = getattr(tool, "name", None)
    return spec



def _handoff_spec(handoff: Handoff) -> dict[str, Any]:
    return {"name": handoff.tool_name, "description": handoff.tool_description,
            "parameters": handoff.input_json_schema, "strict": handoff.strict_json_schema}


def _output_spec(schema: AgentOutputSchemaBase | None) -> dict[str, Any] | None:
    if schema is None:
        return None
    if schema.is_plain_text():
        return {"plain_text": True}
    return {"name": schema.name(), "schema": schema.json_schema(),
            "strict": schema.is_strict_json_schema()}


def _dump_response(response: ModelResponse) -> dict[str, Any]:
    return {
        "usage": usage_of(response.usage.input_tokens, response.usage.output_tokens),
        "output": [_dump(item) for item in response.output],
        "sdk_usage": serialize_usage(response.usage),
        "response_id": response.response_id,
        "request_id": response.request_id,
        "raw_usage": response.raw_usage,
    }


def _dump(item: Any) -> Any:
    # Only the fields the model set, by their wire names: loaded back, the item dumps as the
    # original did, so the next turn's input (and key) is the same after a replay.
    return item.model_dump(mode="json", exclude_unset=True, by_alias=True)


def _load_response(value: dict[str, Any]) -> ModelResponse:
    adapter = _output_item_adapter()
    return ModelResponse(
        output=[adapter.validate_python(item) for item in value["output"]],
        usage=deserialize_usage(value["sdk_usage"]),
        response_id=value["response_id"],
        request_id=value["request_id"],
        raw_usage=value["raw_usage"],
    )


@cache
def _output_item_adapter() -> TypeAdapter[TResponseOutputItem]:
    return TypeAdapter(TResponseOutputItem)


@cache
def _stream_event_adapter() -> TypeAdapter[TResponseStreamEvent]:
    return TypeAdapter(TResponseStreamEvent)
