"""``receipt_model`` is transparent to the Agents SDK: its ``isinstance`` checks see the
wrapped model's class, the capabilities it asks a model about are the wrapped model's, and
request fields that never change the answer (the runner's per-run prompt cache key) do not
split receipts. Against the real SDK, offline via ScriptedModel."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from _fake_models import KW, NAME, direct_args, text_of
from agents import (
    Agent,
    GuardrailFunctionOutput,
    Model,
    ModelProvider,
    ModelResponse,
    ModelSettings,
    ModelTimeoutError,
    MultiProvider,
    OpenAIChatCompletionsModel,
    OutputGuardrail,
    RunConfig,
    Runner,
    UserError,
)
from agents.testing import ModelStep, ScriptedModel, assistant_message
from test_adapter_openai_fidelity import _Spans, collecting_spans

from singleflight_agents import Singleflight
from singleflight_agents.adapters.openai_models import (
    ReceiptModel,
    ReceiptModelProvider,
    receipt_model,
    receipt_model_provider,
)

CONFIG = RunConfig(tracing_disabled=True)


class CachingModel(ScriptedModel):
    """A model that, as the SDK's OpenAI models do, takes the runner's prompt cache key."""

    def _supports_default_prompt_cache_key(self) -> bool:
        return True


def _sent_cache_key(model: ScriptedModel) -> Any:
    return (model.calls[-1].model_settings.extra_args or {}).get("prompt_cache_key")


def test_isinstance_sees_the_wrapped_models_class_and_a_copy_stays_a_wrapper(
        sqlite_sf: Singleflight) -> None:
    chat = OpenAIChatCompletionsModel(model="gpt-test", openai_client=cast(Any, object()))
    wrapped = receipt_model(sqlite_sf, chat, deterministic=True)
    assert isinstance(wrapped, OpenAIChatCompletionsModel)
    assert isinstance(wrapped, ReceiptModel) and isinstance(wrapped, Model)
    assert not isinstance(receipt_model(sqlite_sf, ScriptedModel(), model_name=NAME),
                          OpenAIChatCompletionsModel)
    clone = copy.copy(wrapped)  # protocol lookups (__copy__, __reduce_ex__) are not forwarded
    assert type(clone) is ReceiptModel and clone.inner is chat


def test_every_model_and_provider_method_is_the_wrappers_own() -> None:
    # A method the SDK adds to Model would otherwise answer with the base class's default
    # instead of the wrapped model's, or bypass the engine: a new release must decide which.
    for base, wrapper in ((Model, ReceiptModel), (ModelProvider, ReceiptModelProvider)):
        names = {n for n, v in vars(base).items() if callable(v) and not n.startswith("__")}
        assert names and names <= set(vars(wrapper)), base


class RegisteredProvider(ModelProvider):
    def __init__(self) -> None:
        self.agent_registration = {"harness_id": "h-1"}

    def get_model(self, model_name: str | None) -> Model:
        return ScriptedModel([[assistant_message("hi")]])


def test_a_provider_is_seen_as_the_one_it_wraps(sqlite_sf: Singleflight) -> None:
    multi = MultiProvider()
    wrapped = receipt_model_provider(sqlite_sf, multi)
    assert isinstance(wrapped, MultiProvider) and isinstance(wrapped, ReceiptModelProvider)
    assert wrapped.openai_provider is multi.openai_provider  # type: ignore[attr-defined]
    registered = receipt_model_provider(sqlite_sf, RegisteredProvider())
    assert registered.agent_registration == {"harness_id": "h-1"}  # type: ignore[attr-defined]
    assert not isinstance(registered, MultiProvider)
    assert type(registered.get_model(NAME)) is ReceiptModel


def test_attributes_and_capabilities_are_the_wrapped_models(sqlite_sf: Singleflight) -> None:
    inner = CachingModel()
    wrapped = receipt_model(sqlite_sf, inner, model_name=NAME)
    assert wrapped.calls is inner.calls  # type: ignore[attr-defined]
    assert wrapped._supports_default_prompt_cache_key() is True  # type: ignore[attr-defined]
    assert not hasattr(receipt_model(sqlite_sf, ScriptedModel(), model_name=NAME),
                       "_supports_default_prompt_cache_key")
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = wrapped.nothing_here  # type: ignore[attr-defined]


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
async def test_the_runner_adds_its_prompt_cache_key_through_the_wrapper(
        sqlite_sf: Singleflight, streamed: bool) -> None:
    for inner, expected in ((CachingModel([[assistant_message("hi")]]), True),
                            (ScriptedModel([[assistant_message("hi")]]), False)):
        agent = Agent(name="a", model=receipt_model(sqlite_sf, inner, model_name=NAME))
        if streamed:
            result = Runner.run_streamed(agent, "go", run_config=CONFIG)
            async for _ in result.stream_events():
                pass
        else:
            await Runner.run(agent, "go", run_config=CONFIG)
        key = _sent_cache_key(inner)
        assert (isinstance(key, str) and key.startswith("agents-sdk:run:")) is expected


async def test_a_per_run_prompt_cache_key_replays(db_path: Path) -> None:
    plain = [CachingModel([[assistant_message("x")]]) for _ in range(2)]
    for model in plain:
        await Runner.run(Agent(name="a", model=model), "go", run_config=CONFIG)
    assert _sent_cache_key(plain[0]) != _sent_cache_key(plain[1])  # each run makes its own

    recorder_model = CachingModel([[assistant_message("recorded answer")]])
    with Singleflight(db_path) as recorder:
        agent = Agent(name="a", model=receipt_model(recorder, recorder_model, model_name=NAME,
                                                     deterministic=True))
        assert (await Runner.run(agent, "go", run_config=CONFIG)).final_output == "recorded answer"
    first_key = _sent_cache_key(recorder_model)

    with Singleflight(db_path, mode="replay") as replayer:
        empty = CachingModel([])  # any real call fails
        agent = Agent(name="a", model=receipt_model(replayer, empty, model_name=NAME,
                                                     deterministic=True))
        result = await Runner.run(agent, "go", run_config=CONFIG)  # a new run: a new key
        assert result.final_output == "recorded answer" and len(empty.calls) == 0
        outcomes = replayer.summary()["tools"][f"model:{NAME}"]
        assert outcomes["cache_hits"] == 1
    assert first_key and first_key.startswith("agents-sdk:run:")


@pytest.mark.parametrize("settings", [
    ModelSettings(extra_args={"prompt_cache_key": "other"}),
    ModelSettings(extra_body={"prompt_cache_key": "other", "prompt_cache_retention": "24h"}),
    ModelSettings(prompt_cache_retention="24h", timeout=5.0),
    ModelSettings(prompt_cache_options={"mode": "explicit", "ttl": "30m"}),
])
async def test_hints_share_a_turn_and_what_changes_the_answer_does_not(
        sqlite_sf: Singleflight, settings: ModelSettings) -> None:
    inner = ScriptedModel([[assistant_message(t)] for t in ("first", "second", "third")])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True)
    base = ModelSettings(extra_args={"prompt_cache_key": "one"})
    answers = [text_of(await model.get_response(*direct_args(settings=s), **KW))
               for s in (base, settings, ModelSettings(temperature=0.1, extra_args={"seed": 1}))]
    assert answers == ["first", "first", "second"]
    assert len(inner.calls) == 2  # the model still receives the hints it was given
    assert inner.calls[0].model_settings.extra_args == {"prompt_cache_key": "one"}


def _guarded_agent(model: Any) -> Agent[Any]:
    accept = OutputGuardrail(guardrail_function=lambda _c, _a, _o: GuardrailFunctionOutput(
        output_info=None, tripwire_triggered=False))
    return Agent(name="a", model=model, output_guardrails=[accept])


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
async def test_output_guardrails_keep_the_chat_completions_conversation_policy(
        sqlite_sf: Singleflight, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        streamed: bool, strict: bool) -> None:
    scripted = ScriptedModel([[assistant_message("accepted")]])
    chat = OpenAIChatCompletionsModel(model="gpt-test", openai_client=cast(Any, object()),
                                      strict_feature_validation=strict)

    async def get_response(*args: Any, **kwargs: Any) -> Any:  # what chat completions does
        chat._handle_unsupported_server_managed_conversation_state(
            previous_response_id=kwargs["previous_response_id"],
            conversation_id=kwargs["conversation_id"])
        return await scripted.get_response(*args, **kwargs)

    async def stream_response(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        await get_response(*args, **kwargs)
        async for event in ScriptedModel([[assistant_message("accepted")]]).stream_response(
                *args, **kwargs):
            yield event

    monkeypatch.setattr(chat, "get_response", get_response)
    monkeypatch.setattr(chat, "stream_response", stream_response)
    agent = _guarded_agent(receipt_model(sqlite_sf, chat))
    caplog.set_level(logging.WARNING, logger="openai.agents")

    async def run() -> Any:
        if not streamed:
            return await Runner.run(agent, "go", previous_response_id="resp-1", run_config=CONFIG)
        result = Runner.run_streamed(agent, "go", previous_response_id="resp-1", run_config=CONFIG)
        async for _ in result.stream_events():
            pass
        return result

    if strict:  # the chat model's own refusal, not the runner's "cannot be combined"
        with pytest.raises(UserError, match="OpenAIChatCompletionsModel does not support"):
            await run()
        return
    assert (await run()).final_output == "accepted"
    assert "Ignoring unsupported server-managed conversation state" in caplog.text


async def test_other_models_still_refuse_guardrails_with_server_managed_history(
        sqlite_sf: Singleflight) -> None:
    agent = _guarded_agent(receipt_model(sqlite_sf, ScriptedModel([]), model_name=NAME))
    with pytest.raises(UserError, match="server-managed conversation history"):
        await Runner.run(agent, "go", previous_response_id="resp-1", run_config=CONFIG)


@pytest.fixture
def spans() -> Iterator[_Spans]:
    yield from collecting_spans()


class FixedModel(ScriptedModel):
    """Answers every turn with one response object, so the caller's copy can be told apart."""

    def __init__(self, response: ModelResponse) -> None:
        super().__init__()
        self.response = response

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        return self.response


async def test_the_caller_that_runs_a_turn_gets_the_models_own_response(
        sqlite_sf: Singleflight) -> None:
    answer = await ScriptedModel([[assistant_message("hi")]]).get_response(*direct_args(), **KW)
    model = receipt_model(sqlite_sf, FixedModel(answer), model_name=NAME, deterministic=True)
    first = await model.get_response(*direct_args(), **KW)
    served = await model.get_response(*direct_args(), **KW)  # from the receipt
    assert first is answer  # the model's object: whatever it carries beyond the receipt's fields
    assert served is not answer and text_of(served) == "hi"
    assert sqlite_sf.summary()["tools"][f"model:{NAME}"]["cache_hits"] == 1


async def test_a_stream_of_plain_dict_events_is_relayed_and_its_error_raised(
        sqlite_sf: Singleflight) -> None:
    async def failing_stream(_call: Any) -> AsyncIterator[Any]:
        yield {"type": "response.created", "sequence_number": 0}
        raise RuntimeError("stream blew up")

    model = receipt_model(sqlite_sf, ScriptedModel([ModelStep.stream(failing_stream)]),
                          model_name=NAME, deterministic=True)
    seen: list[Any] = []
    with pytest.raises(RuntimeError, match="stream blew up"):
        async for event in model.stream_response(*direct_args(), **KW):
            seen.append(event)
    assert seen == [{"type": "response.created", "sequence_number": 0}]


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
async def test_the_sdks_model_timeout_is_recorded_on_the_generation_span(
        sqlite_sf: Singleflight, spans: _Spans, streamed: bool) -> None:
    async def hang(_call: Any) -> Any:
        await asyncio.Event().wait()

    inner = ScriptedModel([ModelStep.respond(hang)], emit_traces=True)
    agent = Agent(name="a", model=receipt_model(sqlite_sf, inner, model_name=NAME),
                  model_settings=ModelSettings(timeout=0.01))
    with pytest.raises(ModelTimeoutError):
        if streamed:
            async for _ in Runner.run_streamed(agent, "go").stream_events():
                pass
        else:
            await Runner.run(agent, "go")
    errors = [s["error"] for s in spans.ended
              if s.get("span_data", {}).get("type") == "generation" and s.get("error")]
    assert errors == [{"message": "Error",
                       "data": {"error": "Model call timed out after 0.01 seconds."}}]
