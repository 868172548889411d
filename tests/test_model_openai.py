"""Model-turn receipts for the OpenAI Agents SDK (``receipt_model``, ``receipt_model_provider``).

Offline against the real SDK: every model is an ``agents.testing.ScriptedModel``, whose
``calls`` count the real calls the wrapper let through; agents run with ``Runner.run`` and
``Runner.run_streamed``. In-flight sharing is proven, not hoped for: ``SpyEngine`` sets an
event once N calls have entered the engine, and a scripted turn waits for it before it answers,
so every other caller is already waiting on the turn in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import textwrap
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _fake_models import (
    CONFIG,
    FINAL,
    GATE,
    INSTRUCTIONS,
    KW,
    NAME,
    QUESTION,
    TOOL,
    TURN_DOLLARS,
    USAGE,
    answer,
    collect,
    direct_args,
    hung_tasks,
    is_turn_two,
    live_events,
    lookup,
    text_of,
    turn_one,
    turn_two,
)
from agents import (
    Agent,
    FunctionTool,
    Model,
    ModelProvider,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    RunConfig,
    Runner,
    Usage,
    function_tool,
)
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from agents.tool import tool_namespace
from agents.usage import RequestUsage
from conftest import SECRET, SpyEngine
from openai.types.responses import (
    ResponseFunctionWebSearch,
    ResponseOutputMessage,
    ResponseOutputRefusal,
    ResponseOutputText,
    ResponseReasoningItem,
)
from openai.types.responses.response_function_web_search import ActionSearch
from openai.types.responses.response_output_text import AnnotationURLCitation
from openai.types.responses.response_reasoning_item import Summary
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import BaseModel

from singleflight_agents import Session, Singleflight
from singleflight_agents.adapters.openai_models import (
    ReceiptModel,
    receipt_model,
    receipt_model_provider,
)
from singleflight_agents.models import ReplayMissError


def two_turns() -> list[Any]:
    """A script for two calls, each answered by the request it gets (not by its position: when
    runs share turns, a model may be asked turn 2 first)."""
    return [ModelStep.respond(answer), ModelStep.respond(answer)]


def make_agent(sf: Any, model: Model, *, model_name: str = NAME, instructions: str = INSTRUCTIONS,
               **options: Any) -> Agent[Any]:
    wrapped = receipt_model(sf, model, model_name=model_name, deterministic=True, **options)
    return Agent(name="weather", instructions=instructions, tools=[lookup], model=wrapped)


async def run_streamed(agent: Agent[Any]) -> tuple[Any, list[str]]:
    """The final output and the raw response event types of a streamed run."""
    result = Runner.run_streamed(agent, QUESTION, run_config=CONFIG)
    types = [event.data.type async for event in result.stream_events()
             if event.type == "raw_response_event"]
    return result.final_output, types


def tool_stats(sf: Singleflight, tool: str = TOOL) -> dict[str, Any]:
    return sf.summary()["tools"][tool]


def blocked_stream(events: list[Any], started: asyncio.Event, release: asyncio.Event) -> ModelStep:
    """A stream step that sends its first event, then waits for ``release`` (a stream in
    progress) before sending the rest."""

    async def factory(call: ModelCall) -> AsyncIterator[Any]:
        yield events[0]
        started.set()
        await release.wait()
        for event in events[1:]:
            yield event

    return ModelStep.stream(factory)


def gated_turns(spy: SpyEngine, callers: int) -> list[ModelStep]:
    """Two turns that answer only once all ``callers`` have entered the engine for that turn."""

    async def respond(call: ModelCall) -> list[Any]:
        turn = 2 if is_turn_two(call) else 1
        await asyncio.wait_for(spy.reached(callers * turn).wait(), GATE)
        return answer(call)

    return [ModelStep.respond(respond), ModelStep.respond(respond)]


# -- 1. two runs: one model call per distinct turn ---------------------------------------------


async def test_a_second_run_of_a_two_turn_agent_makes_no_model_call(sf: Singleflight) -> None:
    first, second = ScriptedModel(two_turns()), ScriptedModel(two_turns())
    result1 = await Runner.run(make_agent(sf, first), QUESTION, run_config=CONFIG)
    result2 = await Runner.run(make_agent(sf, second), QUESTION, run_config=CONFIG)
    assert result1.final_output == result2.final_output == FINAL
    assert (len(first.calls), len(second.calls)) == (2, 0)
    assert first.remaining_steps == 0 and second.remaining_steps == 2
    # the second run saw the same items: the tool call of turn 1, the tool's output, the answer
    assert [type(i).__name__ for i in result1.new_items] == [type(i).__name__ for i in result2.new_items]
    stats = tool_stats(sf)
    assert (stats["calls"], stats["executed"], stats["cache_hits"]) == (4, 2, 2)


# -- 2. parallel runs: each turn executed once in total ------------------------------------------


async def test_parallel_identical_runs_share_each_turn_in_flight(spy: SpyEngine) -> None:
    models = [ScriptedModel(gated_turns(spy, callers=4)) for _ in range(4)]
    results = await asyncio.gather(*(Runner.run(make_agent(spy, m), QUESTION, run_config=CONFIG)
                                     for m in models))
    assert [r.final_output for r in results] == [FINAL] * 4
    assert sum(len(m.calls) for m in models) == 2
    stats = tool_stats(spy)
    # every other caller waited on the turn in flight: none was served from the store later
    assert (stats["calls"], stats["executed"], stats["shared_waits"], stats["cache_hits"]) == (8, 2, 6, 0)


def test_runs_in_threads_execute_each_turn_once(sf: Singleflight) -> None:
    models = [ScriptedModel(two_turns()) for _ in range(4)]

    def run(model: ScriptedModel) -> Any:
        try:
            return Runner.run_sync(make_agent(sf, model), QUESTION, run_config=CONFIG).final_output
        finally:  # run_sync keeps this worker thread's loop open for later runs: there are none
            asyncio.get_event_loop_policy().get_event_loop().close()

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(run, models))
    assert outputs == [FINAL] * 4
    assert sum(len(m.calls) for m in models) == 2
    stats = tool_stats(sf)
    assert (stats["calls"], stats["executed"], stats["fallbacks"]) == (8, 2, 0)


# -- 3. replay --------------------------------------------------------------------------------


async def test_replay_serves_recorded_turns_and_a_miss_names_the_record_command(
        sf: Singleflight, store_url: str) -> None:
    recorded = await Runner.run(make_agent(sf, ScriptedModel(two_turns())), QUESTION, run_config=CONFIG)
    sf.close()

    # The mode and the record command belong to the run: here, replaying engines on the store.
    run_id = "replay-" + store_url[-8:]
    replayer = Singleflight(store=store_url, secret=SECRET, mode="replay", run_id=run_id)
    custom = Singleflight(store=store_url, secret=SECRET, mode="replay", run_id=run_id,
                          record_command="make record-evals")
    try:
        empty = ScriptedModel([])  # any call would raise UnexpectedModelCall
        replayed = await Runner.run(make_agent(replayer, empty), QUESTION, run_config=CONFIG)
        assert replayed.final_output == recorded.final_output == FINAL
        assert len(empty.calls) == 0

        changed = make_agent(custom, empty, instructions="Answer in French.")
        with pytest.raises(ReplayMissError) as raised:
            await Runner.run(changed, QUESTION, run_config=CONFIG)
        assert len(empty.calls) == 0
        message = str(raised.value)
        assert raised.value.tool_name == TOOL
        assert message.startswith(f"{TOOL}: no receipt to replay for arguments ")
        assert message.endswith("record it with: make record-evals")

        default = make_agent(replayer, empty, instructions="Answer in German.")
        with pytest.raises(ReplayMissError, match=r"record it with: pytest --singleflight-mode=record"):
            await Runner.run(default, QUESTION, run_config=CONFIG)
        assert len(empty.calls) == 0
        custom.flush_stats()
        stats = tool_stats(replayer)  # both engines count under the one run id
        assert (stats["cache_hits"], stats["executed"], stats["replay_misses"]) == (2, 0, 2)
    finally:
        replayer.close()
        custom.close()


async def test_a_session_in_replay_governs_a_wrapper_made_on_a_recording_engine(
        sf: Singleflight, store_url: str) -> None:
    recorded = await Runner.run(make_agent(sf, ScriptedModel(two_turns())), QUESTION, run_config=CONFIG)
    assert sf.current_mode() == "record"
    empty = ScriptedModel([])
    with Session(store_url, mode="replay", secret=SECRET) as run, \
            run.scope("eval") as scope:
        assert sf.current_mode() == "replay"
        replayed = await Runner.run(make_agent(sf, empty), QUESTION, run_config=CONFIG)
        assert replayed.final_output == recorded.final_output == FINAL
        with pytest.raises(ReplayMissError):
            await Runner.run(make_agent(sf, empty, instructions="Be terse."), QUESTION,
                             run_config=CONFIG)
    assert len(empty.calls) == 0
    assert [str(o.source) for o in scope.outcomes] == ["cache_hit"] * 2
    assert [m.tool_name for m in scope.misses] == [TOOL]


async def test_streamed_turns_replay_too(sf: Singleflight, store_url: str) -> None:
    recorded = await run_streamed(make_agent(sf, ScriptedModel(two_turns())))
    sf.close()
    with Singleflight(store=store_url, secret=SECRET, mode="replay") as replayer:
        empty = ScriptedModel([])
        assert await run_streamed(make_agent(replayer, empty)) == recorded
        with pytest.raises(ReplayMissError, match=rf"^{TOOL}: no receipt to replay"):
            await run_streamed(make_agent(replayer, empty, instructions="Be terse."))
        assert len(empty.calls) == 0


# -- 4. the key -------------------------------------------------------------------------------


class Place(BaseModel):
    city: str


@function_tool(name_override="lookup")
def lookup_with_units(city: str, units: str = "metric") -> str:
    """Look up the weather in a city.

    Args:
        city: The city.
        units: metric or imperial.
    """
    return f"sunny in {city}"


@function_tool(name_override="lookup", description_override="Find the forecast for a city.")
def lookup_described(city: str) -> str:
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    return f"sunny in {city}"


@function_tool(name_override="lookup")
def lookup_other_code(city: str) -> str:
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    return f"rainy in {city}"  # another implementation behind the same schema


ANSWER = '{"city": "Oslo"}'  # a valid final answer for a plain-text and a Place output alike


def billing(description: str | None = None) -> Agent[Any]:
    return Agent(name="billing", instructions="Handle billing.", handoff_description=description)


def one_turn_agent(sf: Singleflight, model: ScriptedModel, *, model_name: str = NAME,
                   **agent_fields: Any) -> Agent[Any]:
    fields: dict[str, Any] = {"name": "weather", "instructions": INSTRUCTIONS, "tools": [lookup],
                              **agent_fields}
    wrapped = receipt_model(sf, model, model_name=model_name, deterministic=True)
    return Agent(model=wrapped, **fields)


async def calls_of(sf: Singleflight, **variant: Any) -> int:
    """How many model calls one run of the one-turn agent, varied by ``variant``, makes."""
    model = ScriptedModel([[assistant_message(ANSWER)]])
    result = await Runner.run(one_turn_agent(sf, model, **variant), QUESTION, run_config=CONFIG)
    assert result.final_output in (ANSWER, Place(city="Oslo"))
    return len(model.calls)


HANDOFF = {"handoffs": [billing()]}
TEMPERATURE = {"model_settings": ModelSettings(temperature=0.2)}

# name: (the agent recorded first, the change to it that must be a new request)
KEYED_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "instructions": ({}, {"instructions": "Answer in two sentences."}),
    "tool-added-parameter": ({}, {"tools": [lookup_with_units]}),
    "tool-changed-description": ({}, {"tools": [lookup_described]}),
    "tool-removed": ({}, {"tools": []}),
    "handoff-added": ({}, HANDOFF),
    "handoff-changed-description": (HANDOFF, {"handoffs": [billing("Questions about invoices.")]}),
    "output-type": ({}, {"output_type": Place}),
    "temperature-set": ({}, TEMPERATURE),
    "temperature-changed": (TEMPERATURE, {"model_settings": ModelSettings(temperature=0.9)}),
    "model-name": ({}, {"model_name": "scripted-large"}),
}


@pytest.mark.parametrize("variant", list(KEYED_VARIANTS))
async def test_what_the_model_is_told_is_keyed(sqlite_sf: Singleflight, variant: str) -> None:
    base, changed = KEYED_VARIANTS[variant]
    assert await calls_of(sqlite_sf, **base) == 1  # records the base request
    assert await calls_of(sqlite_sf, **changed) == 1  # a new request: a new call
    assert await calls_of(sqlite_sf, **changed) == 0  # ... recorded once
    assert await calls_of(sqlite_sf, **base) == 0  # unchanged: no call
    if variant == "handoff-added":  # a new target object with the same schema: the same key
        assert await calls_of(sqlite_sf, handoffs=[billing()]) == 0


async def test_what_does_not_decide_the_answer_is_not_keyed(sqlite_sf: Singleflight) -> None:
    assert await calls_of(sqlite_sf) == 1
    assert await calls_of(sqlite_sf, tools=[lookup_other_code]) == 0  # same schema, other code
    assert await calls_of(sqlite_sf, name="another-agent-name") == 0  # the agent's name is not sent

    # The tracing setting is passed to the model but is not part of the request.
    inner = ScriptedModel([[assistant_message("hi")]])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True)
    responses = [await model.get_response(*direct_args(tracing=tracing), **KW)
                 for tracing in (ModelTracing.DISABLED, ModelTracing.ENABLED,
                                 ModelTracing.ENABLED_WITHOUT_DATA)]
    assert len(inner.calls) == 1
    assert {r.output[0].content[0].text for r in responses} == {"hi"}


async def test_response_ids_prompt_and_stream_are_keyed(sqlite_sf: Singleflight) -> None:
    inner = ScriptedModel([[assistant_message(str(i))] for i in range(5)])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True)
    variants: list[dict[str, Any]] = [
        {}, {"previous_response_id": "resp-1"},
        {"prompt": {"id": "pmpt_1", "version": "2"}}, {"prompt": {"id": "pmpt_1", "version": "3"}},
    ]
    texts = [(await model.get_response(*direct_args(), **{**KW, **v})).output[0].content[0].text
             for v in variants]
    assert texts == ["0", "1", "2", "3"] and len(inner.calls) == 4
    again = [(await model.get_response(*direct_args(), **{**KW, **v})).output[0].content[0].text
             for v in variants]
    assert again == texts and len(inner.calls) == 4
    # A stream of the same request is a receipt of its own.
    events = await collect(model.stream_response(*direct_args(), **KW))
    assert len(inner.calls) == 5 and events[-1].response.output[0].content[0].text == "4"


async def test_key_receives_the_request_dict(sqlite_sf: Singleflight) -> None:
    seen: list[dict[str, Any]] = []

    def key(request: dict[str, Any]) -> Any:
        seen.append(request)
        return request["system_instructions"]  # this eval shares turns by instructions alone

    inner = ScriptedModel([[assistant_message("hi")]])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True, key=key)
    for text in ("hello", "bonjour"):
        await model.get_response(*direct_args(input=text), **KW)
    assert len(inner.calls) == 1
    assert [r["input"] for r in seen] == ["hello", "bonjour"]
    assert {r["model"] for r in seen} == {NAME}


async def test_a_secret_header_is_keyed_and_can_be_kept_out_of_receipts(sqlite_sf: Singleflight) -> None:
    inner = ScriptedModel([[assistant_message("a")], [assistant_message("b")]])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True,
                          redact=["request.model_settings.extra_headers.Authorization"])
    for token in ("sk-one", "sk-two", "sk-one"):
        settings = ModelSettings(extra_headers={"Authorization": f"Bearer {token}"})
        await model.get_response(*direct_args(settings=settings), **KW)
    assert len(inner.calls) == 2  # the header is part of the request
    receipts = list(sqlite_sf.store.iter_receipts())
    assert len(receipts) == 2
    assert all("sk-" not in (r.inputs or "") and "[redacted]" in (r.inputs or "") for r in receipts)


def _namespaced(tool: FunctionTool) -> FunctionTool:
    [namespaced] = tool_namespace(name="weather", description="Weather tools.", tools=[tool])
    return namespaced


# Fields of a FunctionTool that OpenAIResponsesModel sends to the model (see its
# _convert_function_tool and _convert_tools): a change is another request, not a replay.
TOOL_FIELDS_SENT: dict[str, Callable[[FunctionTool], FunctionTool]] = {
    "defer_loading": lambda tool: dataclasses.replace(tool, defer_loading=True),
    "allowed_callers": lambda tool: dataclasses.replace(tool, allowed_callers=["programmatic"]),
    "output_json_schema": lambda tool: dataclasses.replace(
        tool, output_json_schema={"type": "object", "properties": {"sky": {"type": "string"}}}),
    "tool_namespace": _namespaced,
}


@pytest.mark.parametrize("field", list(TOOL_FIELDS_SENT))
async def test_every_tool_field_sent_to_the_model_is_keyed(sqlite_sf: Singleflight, field: str) -> None:
    inner = ScriptedModel([[assistant_message("plain")], [assistant_message("changed")]])
    model = receipt_model(sqlite_sf, inner, model_name=NAME, deterministic=True)
    await model.get_response(*direct_args(tools=[lookup]), **KW)
    changed = TOOL_FIELDS_SENT[field](lookup)
    response = await model.get_response(*direct_args(tools=[changed]), **KW)
    assert len(inner.calls) == 2
    assert response.output[0].content[0].text == "changed"


# -- 5. fidelity ------------------------------------------------------------------------------


def rich_step() -> ModelStep:
    usage = Usage(
        requests=1, input_tokens=11, output_tokens=7, total_tokens=18,
        input_tokens_details=InputTokensDetails(cached_tokens=3, cache_write_tokens=4),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=2),
        request_usage_entries=[RequestUsage(
            input_tokens=11, output_tokens=7, total_tokens=18,
            input_tokens_details=InputTokensDetails(cached_tokens=3, cache_write_tokens=4),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=2))],
    )
    return ModelStep(
        output=[ResponseReasoningItem(id="rs_1", type="reasoning", summary=[]),
                function_call("lookup", {"city": "Oslo"}, call_id="call-1"),
                assistant_message("Checking, résumé ☀", item_id="msg-1")],
        usage=usage, response_id="resp-42", request_id="req-7",
        raw_usage={"input_tokens": 11, "provider": {"cost": 0.5}},
    )


def as_parts(response: ModelResponse) -> dict[str, Any]:
    return {
        "output": [item.model_dump(exclude_unset=True) for item in response.output],
        "types": [type(item) for item in response.output],
        "usage": (response.usage.requests, response.usage.input_tokens, response.usage.output_tokens,
                  response.usage.total_tokens, response.usage.input_tokens_details,
                  response.usage.output_tokens_details, response.usage.request_usage_entries),
        "ids": (response.response_id, response.request_id),
        "raw_usage": response.raw_usage,
    }


async def test_a_replayed_response_equals_the_original(sf: Singleflight) -> None:
    args = direct_args(settings=ModelSettings(preserve_raw_usage=True), tools=[lookup])
    original = await ScriptedModel([rich_step()]).get_response(*args, **KW)  # unwrapped
    inner = ScriptedModel([rich_step()])
    executed = await receipt_model(sf, inner, model_name=NAME, deterministic=True).get_response(*args, **KW)
    replayed = await receipt_model(sf, ScriptedModel([]), model_name=NAME,
                                   deterministic=True).get_response(*args, **KW)
    assert len(inner.calls) == 1
    assert as_parts(executed) == as_parts(original)
    assert as_parts(replayed) == as_parts(original)
    assert replayed == original  # the dataclass, field by field
    assert replayed.usage.input_tokens_details.cached_tokens == 3
    assert replayed.usage.output_tokens_details.reasoning_tokens == 2


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


# -- 6. streaming -----------------------------------------------------------------------------


async def test_a_second_streamed_run_replays_the_same_events(sf: Singleflight) -> None:
    first, second = ScriptedModel(two_turns()), ScriptedModel(two_turns())
    output1, types1 = await run_streamed(make_agent(sf, first))
    output2, types2 = await run_streamed(make_agent(sf, second))
    assert output1 == output2 == FINAL
    assert (len(first.calls), len(second.calls)) == (2, 0)
    assert types1 == types2
    assert types1.count("response.created") == types1.count("response.completed") == 2
    assert types1[0] == "response.created" and types1[-1] == "response.completed"
    # the same request, not streamed, is a receipt of its own
    plain = ScriptedModel(two_turns())
    assert (await Runner.run(make_agent(sf, plain), QUESTION, run_config=CONFIG)).final_output == FINAL
    assert len(plain.calls) == 2


async def test_concurrent_streamed_runs_share_each_turn(spy: SpyEngine) -> None:
    models = [ScriptedModel(gated_turns(spy, callers=3)) for _ in range(3)]
    runs = await asyncio.gather(*(run_streamed(make_agent(spy, m)) for m in models))
    assert sum(len(m.calls) for m in models) == 2
    assert [output for output, _ in runs] == [FINAL] * 3
    assert runs[0][1] == runs[1][1] == runs[2][1]  # the live stream and the two shared ones
    stats = tool_stats(spy)
    assert (stats["calls"], stats["executed"], stats["shared_waits"]) == (6, 2, 4)


async def test_stream_response_records_and_replays_event_by_event(sf: Singleflight) -> None:
    output = [function_call("lookup", {"city": "Oslo"}, call_id="call-1"), assistant_message(FINAL)]
    live = await live_events(output)
    inner = ScriptedModel([output])
    recorded = await collect(receipt_model(sf, inner, model_name=NAME, deterministic=True)
                             .stream_response(*direct_args(), **KW))
    replayed = await collect(receipt_model(sf, ScriptedModel([]), model_name=NAME, deterministic=True)
                             .stream_response(*direct_args(), **KW))
    assert len(inner.calls) == 1
    dumps = [[event.model_dump(exclude_unset=True) for event in events]
             for events in (live, recorded, replayed)]
    assert dumps[0] == dumps[1] == dumps[2]
    assert [type(e) for e in replayed] == [type(e) for e in live]


async def test_a_stream_closed_early_is_abandoned_and_the_next_call_records_it(sf: Singleflight) -> None:
    events = await live_events(turn_two())
    started, release = asyncio.Event(), asyncio.Event()
    inner = ScriptedModel([blocked_stream(events, started, release), turn_two()])
    model = receipt_model(sf, inner, model_name=NAME, deterministic=True)

    stream = model.stream_response(*direct_args(), **KW)
    first = await anext(stream)
    assert first.type == "response.created" and started.is_set()  # the turn is in progress
    await stream.aclose()  # the consumer stops early
    assert hung_tasks() == []

    again = await collect(model.stream_response(*direct_args(), **KW))  # records it afresh
    assert [e.type for e in again] == [e.type for e in events]
    assert len(inner.calls) == 2
    served = await collect(model.stream_response(*direct_args(), **KW))
    assert [e.type for e in served] == [e.type for e in events] and len(inner.calls) == 2
    stats = tool_stats(sf)
    assert (stats["executed"], stats["cache_hits"], stats["failures"], stats["takeovers"],
            stats["fallbacks"]) == (1, 1, 0, 0, 0)


async def test_a_cancelled_stream_consumer_leaves_no_task_behind(sf: Singleflight) -> None:
    events = await live_events(turn_two())
    started, release = asyncio.Event(), asyncio.Event()
    inner = ScriptedModel([blocked_stream(events, started, release)])
    model = receipt_model(sf, inner, model_name=NAME, deterministic=True)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in model.stream_response(*direct_args(), **KW):
            first.set()  # ... and on, to wait for the next event: the turn is still streaming

    consumer = asyncio.ensure_future(consume())
    await first.wait()
    assert started.is_set() and not release.is_set()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert hung_tasks() == []


async def test_a_waiter_takes_over_a_stream_whose_owner_stopped_early(spy: SpyEngine) -> None:
    events = await live_events(turn_two())
    started, release = asyncio.Event(), asyncio.Event()
    owner_model = ScriptedModel([blocked_stream(events, started, release)])
    waiter_model = ScriptedModel([turn_two()])
    owner = receipt_model(spy, owner_model, model_name=NAME, deterministic=True)
    waiter = receipt_model(spy, waiter_model, model_name=NAME, deterministic=True)

    owner_stream = owner.stream_response(*direct_args(), **KW)
    await anext(owner_stream)
    waiting = asyncio.ensure_future(collect(waiter.stream_response(*direct_args(), **KW)))
    await asyncio.wait_for(spy.reached(2).wait(), GATE)  # it waits on the owner's turn
    await owner_stream.aclose()
    taken_over = await asyncio.wait_for(waiting, GATE)
    assert [e.type for e in taken_over] == [e.type for e in events]
    assert (len(owner_model.calls), len(waiter_model.calls)) == (1, 1)
    later = ScriptedModel([])
    served = await collect(receipt_model(spy, later, model_name=NAME, deterministic=True)
                           .stream_response(*direct_args(), **KW))
    assert [e.type for e in served] == [e.type for e in events] and len(later.calls) == 0
    stats = tool_stats(spy)
    assert (stats["executed"], stats["fallbacks"], stats["takeovers"]) == (1, 0, 0)


async def test_a_streamed_run_cancelled_mid_turn_leaves_the_turn_to_the_next_run(sf: Singleflight) -> None:
    events = await live_events(turn_one())
    started, release = asyncio.Event(), asyncio.Event()
    stopped = ScriptedModel([blocked_stream(events, started, release)])
    result = Runner.run_streamed(make_agent(sf, stopped), QUESTION, run_config=CONFIG)
    async with contextlib.aclosing(result.stream_events()) as stream:
        async for event in stream:
            if event.type == "raw_response_event":
                result.cancel()  # the consumer stops in the middle of turn 1
                break
    assert result.run_loop_task is not None and result.run_loop_task.done()
    assert len(stopped.calls) == 1

    fresh = ScriptedModel(two_turns())
    output, types = await asyncio.wait_for(run_streamed(make_agent(sf, fresh)), GATE)
    assert output == FINAL and len(fresh.calls) == 2  # turn 1 was never stored: recorded now
    replay = ScriptedModel([])
    assert await run_streamed(make_agent(sf, replay)) == (output, types) and len(replay.calls) == 0
    stats = tool_stats(sf)
    assert (stats["executed"], stats["takeovers"], stats["fallbacks"], stats["failures"]) == (2, 0, 0, 0)


# -- 7. ModelProvider ---------------------------------------------------------------------------


class ScriptedProvider(ModelProvider):
    """Looks models up by name; each name is one ScriptedModel for the whole run."""

    def __init__(self, names: list[str]) -> None:
        self.models = {name: ScriptedModel(two_turns()) for name in names}
        self.asked: list[str | None] = []

    def get_model(self, model_name: str | None) -> Model:
        self.asked.append(model_name)
        return self.models[str(model_name)]


async def test_a_wrapped_provider_keys_turns_by_the_model_name(sf: Singleflight) -> None:
    def agent(model: str) -> Agent[Any]:
        return Agent(name="weather", instructions=INSTRUCTIONS, tools=[lookup], model=model)

    outputs = []
    providers = [ScriptedProvider(["my-model", "my-other-model"]) for _ in range(2)]
    for provider in providers:
        config = RunConfig(tracing_disabled=True,
                           model_provider=receipt_model_provider(sf, provider, deterministic=True))
        outputs.append((await Runner.run(agent("my-model"), QUESTION, run_config=config)).final_output)
    assert outputs == [FINAL, FINAL]
    assert [len(p.models["my-model"].calls) for p in providers] == [2, 0]
    assert "my-model" in providers[1].asked

    # another name is another model: its turns are its own
    config = RunConfig(tracing_disabled=True,
                       model_provider=receipt_model_provider(sf, providers[1], deterministic=True))
    assert (await Runner.run(agent("my-other-model"), QUESTION, run_config=config)).final_output == FINAL
    assert len(providers[1].models["my-other-model"].calls) == 2

    tools = sf.summary()["tools"]
    assert (tools["model:my-model"]["calls"], tools["model:my-model"]["executed"]) == (4, 2)
    assert tools["model:my-other-model"]["executed"] == 2
    wrapped = receipt_model_provider(sf, providers[1], deterministic=True).get_model("my-model")
    assert isinstance(wrapped, ReceiptModel) and wrapped.model == "my-model"


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


# -- 8. unflagged models and bad arguments --------------------------------------------------------------


async def test_an_unflagged_model_runs_every_turn_unshared_and_stores_nothing(
        store_url: str) -> None:
    # One policy everywhere: a model without a flag is accepted and never shared.
    inner = ScriptedModel([[assistant_message("a")], [assistant_message("a")]])
    provider = ScriptedProvider([NAME])
    with Singleflight(store=store_url, secret=SECRET) as app:
        model = receipt_model(app, inner, model_name=NAME)
        provided = receipt_model_provider(app, provider).get_model(NAME)
        with Session(store_url, secret=SECRET) as run, run.scope("unflagged") as scope:
            for wrapped in (model, model, provided):
                await wrapped.get_response(*direct_args(), **KW)
            assert list(run.engine.store.iter_receipts()) == []
            stats = tool_stats(run.engine)
    assert (len(inner.calls), len(provider.models[NAME].calls)) == (2, 1)
    assert [str(o.source) for o in scope.outcomes] == ["executed_unshared"] * 3
    assert all(o.receipt is None for o in scope.outcomes)
    assert (stats["calls"], stats["unshared"], stats["executed"], stats["cache_hits"]) == (3, 3, 0, 0)


def test_mode_is_not_an_option_of_a_model_wrapper(sqlite_sf: Singleflight) -> None:
    for wrap in (lambda **kw: receipt_model(sqlite_sf, ScriptedModel([]), model_name=NAME, **kw),
                 lambda **kw: receipt_model_provider(sqlite_sf, ScriptedProvider([]), **kw)):
        with pytest.raises(TypeError, match=r"mode= is not a tool option: it belongs to the run"):
            wrap(deterministic=True, mode="replay")
        with pytest.raises(TypeError, match=r"record_command= .* belongs to the run"):
            wrap(deterministic=True, record_command="make record")


def test_bad_arguments_are_refused(sqlite_sf: Singleflight) -> None:
    with pytest.raises(TypeError, match=r"model_name="):
        receipt_model(sqlite_sf, ScriptedModel([]), deterministic=True)  # it has no .model name
    with pytest.raises(TypeError, match=r"agents\.Model.*str"):
        receipt_model(sqlite_sf, "not a model", deterministic=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"agents\.ModelProvider"):
        receipt_model_provider(sqlite_sf, ScriptedModel([]), deterministic=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Singleflight engine or the singleflight fixture"):
        receipt_model(object(), ScriptedModel([]), model_name=NAME, deterministic=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tool_name"):
        receipt_model(sqlite_sf, ScriptedModel([]), model_name=NAME, deterministic=True, tool_name="x")
    with pytest.raises(TypeError, match=r"colour"):
        receipt_model(sqlite_sf, ScriptedModel([]), model_name=NAME, deterministic=True, colour=1)
    model = receipt_model(sqlite_sf, ScriptedModel([]), model_name=NAME, deterministic=True)
    again = receipt_model(sqlite_sf, model, side_effecting=True)  # wrapped again: new options win
    assert again.inner is model.inner and again.model == NAME and again is not model


async def test_a_side_effecting_model_is_called_every_time_and_stores_nothing(sf: Singleflight) -> None:
    models = [ScriptedModel(two_turns()) for _ in range(2)]
    for model in models:
        agent = Agent(name="weather", instructions=INSTRUCTIONS, tools=[lookup],
                      model=receipt_model(sf, model, model_name=NAME, side_effecting=True))
        assert (await Runner.run(agent, QUESTION, run_config=CONFIG)).final_output == FINAL
    assert sum(len(m.calls) for m in models) == 4
    streamed = ScriptedModel(two_turns())
    agent = Agent(name="weather", instructions=INSTRUCTIONS, tools=[lookup],
                  model=receipt_model(sf, streamed, model_name=NAME, side_effecting=True))
    assert (await run_streamed(agent))[0] == FINAL and len(streamed.calls) == 2
    assert list(sf.store.iter_receipts()) == []
    stats = tool_stats(sf)  # counted, as unshared executions
    assert (stats["calls"], stats["unshared"], stats["executed"], stats["cache_hits"]) == (6, 6, 0, 0)


# -- 9. tokens and dollars ------------------------------------------------------------------------

PRICES = {NAME: {"input": 2.0, "output": 8.0}}


async def run_metered(sf: Singleflight, streamed: bool, **options: Any) -> None:
    model = ScriptedModel(two_turns())
    model.set_default_usage(USAGE)
    agent = make_agent(sf, model, **options)
    if streamed:
        assert (await run_streamed(agent))[0] == FINAL
    else:
        assert (await Runner.run(agent, QUESTION, run_config=CONFIG)).final_output == FINAL


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
async def test_tokens_and_dollars_spent_and_saved(store_url: str, streamed: bool) -> None:
    with Singleflight(store=store_url, secret=SECRET, prices=PRICES) as sf:
        for _ in range(2):
            await run_metered(sf, streamed)
        stats = tool_stats(sf)
        assert (stats["executed"], stats["cache_hits"]) == (2, 2)
        assert (stats["tokens_in"], stats["tokens_out"]) == (2000, 400)
        assert (stats["tokens_in_saved"], stats["tokens_out_saved"]) == (2000, 400)
        assert stats["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)
        assert stats["dollars_saved"] == pytest.approx(2 * TURN_DOLLARS)
        assert stats["unpriced"] == 0
        totals = sf.summary()
        assert totals["dollars_spent"] == pytest.approx(2 * TURN_DOLLARS)


async def test_prices_given_to_the_wrapper_win_over_the_engines(sqlite_sf: Singleflight) -> None:
    for _ in range(2):
        await run_metered(sqlite_sf, False, prices={NAME: [1.0, 0.0]})
    stats = tool_stats(sqlite_sf)
    assert stats["dollars_spent"] == pytest.approx(2 * 1000 / 1e6)
    assert stats["dollars_saved"] == pytest.approx(2 * 1000 / 1e6)


async def test_side_effecting_turns_are_spent_every_time(store_url: str) -> None:
    with Singleflight(store=store_url, secret=SECRET, prices=PRICES) as sf:
        for _ in range(2):
            model = ScriptedModel(two_turns())
            model.set_default_usage(USAGE)
            agent = Agent(name="weather", instructions=INSTRUCTIONS, tools=[lookup],
                          model=receipt_model(sf, model, model_name=NAME, side_effecting=True))
            assert (await Runner.run(agent, QUESTION, run_config=CONFIG)).final_output == FINAL
        stats = tool_stats(sf)
        assert (stats["tokens_in"], stats["tokens_out"], stats["tokens_in_saved"]) == (4000, 800, 0)
        assert stats["dollars_spent"] == pytest.approx(4 * TURN_DOLLARS)
        assert stats["dollars_saved"] == 0


async def test_an_unpriced_model_counts_tokens_but_no_dollars(sf: Singleflight) -> None:
    for _ in range(2):
        await run_metered(sf, False, model_name="unlisted")
    stats = tool_stats(sf, "model:unlisted")
    assert (stats["tokens_in"], stats["tokens_in_saved"], stats["unpriced"]) == (2000, 2000, 4)
    assert stats["dollars_spent"] == stats["dollars_saved"] == 0


def test_a_bad_price_table_names_the_model(store_url: str, sqlite_sf: Singleflight) -> None:
    with pytest.raises(ValueError, match=r"'scripted'"):
        Singleflight(store=store_url, secret=SECRET, prices={NAME: {"input": 2.0}})
    with pytest.raises(ValueError, match=r"'gpt-x'"):
        receipt_model(sqlite_sf, ScriptedModel([]), model_name=NAME, deterministic=True,
                      prices={"gpt-x": [1.0, -2.0]})
    with pytest.raises(ValueError, match=r"'my-model'"):
        receipt_model_provider(sqlite_sf, ScriptedProvider([]), deterministic=True,
                               prices={"my-model": "cheap"})


# -- 10. the pytest plugin -----------------------------------------------------------------------

PLUGIN_TEST = '''
from pathlib import Path

from agents import Agent, RunConfig, Runner, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call

from singleflight_agents.adapters.openai_models import receipt_model

RECORD = {record}
INSTRUCTIONS = {instructions!r}


@function_tool
def lookup(city: str) -> str:
    """Look up the weather in a city."""
    return "sunny in " + city


def test_weather_agent(singleflight):
    steps = [[function_call("lookup", {{"city": "Oslo"}}, call_id="call-1")],
             [assistant_message("Sunny.")]]
    model = ScriptedModel(steps if RECORD else [])  # without steps any call raises
    wrapped = receipt_model(singleflight, model, model_name="scripted", deterministic=True)
    agent = Agent(name="weather", instructions=INSTRUCTIONS, tools=[lookup], model=wrapped)
    try:
        result = Runner.run_sync(agent, "Weather in Oslo?", run_config=RunConfig(tracing_disabled=True))
    finally:
        with open(Path(__file__).parent / "calls.log", "a") as log:
            log.write(f"{{len(model.calls)}}\\n")
    assert result.final_output == "Sunny."
    assert len(model.calls) == (2 if RECORD else 0)
    assert [str(o.source) for o in singleflight.outcomes] == (
        ["executed"] * 2 if RECORD else ["cache_hit"] * 2)
'''


def test_the_pytest_plugin_records_then_replays_model_turns_only_with_the_recording_key(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GITHUB_STEP_SUMMARY", "SINGLEFLIGHT_RUN_ID", "SINGLEFLIGHT_PRICES", "SINGLEFLIGHT_SECRET",
                 "PYTEST_XDIST_WORKER", "PYTEST_XDIST_AUTO_NUM_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    db, log = pytester.path / "receipts.db", pytester.path / "calls.log"
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")

    def session(record: bool, instructions: str, mode: str, secret: str | None = None) -> pytest.RunResult:
        if secret is None:
            monkeypatch.delenv("SINGLEFLIGHT_SECRET", raising=False)  # the key file beside the store
        else:
            monkeypatch.setenv("SINGLEFLIGHT_SECRET", secret)
        pytester.makepyfile(test_weather=textwrap.dedent(
            PLUGIN_TEST.format(record=record, instructions=instructions)))
        return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                  f"--singleflight-db={db}", f"--singleflight-mode={mode}")

    session(True, INSTRUCTIONS, "record").assert_outcomes(passed=1)
    assert log.read_text().split() == ["2"]

    # Receipts signed with another key (another branch's secret) are misses: the model is never called.
    other = session(False, INSTRUCTIONS, "replay", secret="another-branch-key-" + "b" * 24)
    other.assert_outcomes(failed=1)
    assert log.read_text().split() == ["2", "0"]
    out = other.stdout.str()
    assert f"ReplayMissError: {TOOL}: no receipt to replay" in out
    assert (f"record it with: pytest --singleflight-mode=record --singleflight-db={db} "
            f"test_weather.py::test_weather_agent") in out
    assert "failed their signature check" in out

    replayed = session(False, INSTRUCTIONS, "replay")  # the recording key: served from receipts
    replayed.assert_outcomes(passed=1)
    assert "2 calls, 0 executed, 2 served from receipts" in replayed.stdout.str()
    assert log.read_text().split() == ["2", "0", "0"]

    changed = session(False, "Answer in French.", "replay")
    changed.assert_outcomes(failed=1)
    assert log.read_text().split() == ["2", "0", "0", "0"]
    out = changed.stdout.str()
    assert f"ReplayMissError: {TOOL}: no receipt to replay for arguments" in out
    assert (f"record it with: pytest --singleflight-mode=record --singleflight-db={db} "
            f"test_weather.py::test_weather_agent") in out
