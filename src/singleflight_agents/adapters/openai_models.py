"""OpenAI Agents SDK adapter for model turns: ``receipt_model`` and ``receipt_model_provider``.

A wrapped ``agents.Model`` sends each turn through the engine under the tool name
``model:<name>``. The key is everything that decides the answer: the model name, system
instructions, input items, model settings (``extra_headers`` included), the
tools' and handoffs' schemas (all the SDK sends of a function tool; hosted tools by their
configuration), the output schema, ``previous_response_id`` and ``prompt``. Never keyed: the
tracing setting, the Python objects behind tools and handoffs, trace, span and request ids,
and the settings that steer caching, retries and timeouts but not the answer
(``prompt_cache_key`` and the other ``_turns.ANSWER_NEUTRAL`` fields, also inside
``extra_args`` / ``extra_body``): the runner's prompt cache key, generated per run, replays.
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
import contextlib
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
from ._agents_stream import IncompleteStreamError, LiveStream, dump, relay
from ._turns import Executor, Request, Turns, jsonable, setting, usage_of, without_hints

__all__ = ["IncompleteStreamError", "ReceiptModel", "ReceiptModelProvider", "receipt_model",
           "receipt_model_provider"]


class _Ids(TypedDict):
    """The keyword arguments of ``Model.get_response`` and ``Model.stream_response``."""

    previous_response_id: str | None
    conversation_id: str | None
    prompt: ResponsePromptParam | None


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


class _SeenAsInner:
    """To the SDK, the object this one wraps (``inner``): ``isinstance`` checks pass for its
    class (the runner picks policies by a model's class), and any attribute this one does not
    have is its (capabilities such as ``_supports_default_prompt_cache_key``, a provider's
    ``agent_registration``)."""

    @property  # type: ignore[misc]  # isinstance() consults __class__ after type()
    def __class__(self) -> type[Any]:
        inner = self.__dict__.get("inner")
        return type(self) if inner is None else type(inner)

    def __getattr__(self, name: str) -> Any:
        # Only what normal lookup misses; protocol names (__deepcopy__, ...) stay this object's.
        inner = self.__dict__.get("inner")
        if inner is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)


class ReceiptModel(_SeenAsInner, Model):
    """An ``agents.Model`` whose turns go through the engine; see :func:`receipt_model`. To
    the SDK it is the model it wraps, as far as its class and attributes go."""

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

        ran_here: list[ModelResponse] = []

        async def call(request: Request) -> dict[str, Any]:
            ran_here.append(await self.inner.get_response(*args, **ids))
            return _dump_response(ran_here[-1])

        request = self._request(*args, **ids)
        outcome = await self._turns.run(call, request, shared=self._shareable(conversation_id))
        # The caller that ran the turn gets the model's own response (objects, fields and all);
        # a caller served by it, in flight or from the store, gets the receipt's.
        return ran_here[-1] if ran_here else _load_response(outcome.value)

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
        # The engine runs `live.record` in this task's loop if this caller owns the turn, and
        # its events reach this caller as they arrive; otherwise the outcome carries them.
        live = LiveStream(lambda: self.inner.stream_response(*args, **ids),
                          self._turns.tool_name)
        turn = asyncio.ensure_future(
            self._turns.run(live.record, request, stream=True, shared=self._shareable(conversation_id)))
        async with contextlib.aclosing(relay(live, turn)) as events:  # closed with this one
            async for event in events:
                yield event

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
            "model_settings": without_hints(model_settings.to_json_dict()),
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


class ReceiptModelProvider(_SeenAsInner, ModelProvider):
    """A ``ModelProvider`` whose models are :class:`ReceiptModel`\\ s; see
    :func:`receipt_model_provider`. To the SDK it is the provider it wraps, as far as its
    class and attributes go."""

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
        "output": [dump(item) for item in response.output],
        "sdk_usage": serialize_usage(response.usage),
        "response_id": response.response_id,
        "request_id": response.request_id,
        "raw_usage": response.raw_usage,
    }


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
