"""Benchmark 9: model turns served from receipts (``receipt_model``, ``receipt_chat_model``)
against their peers, on each store.

- Warm turn: the OpenAI Agents SDK's ``ReceiptModel.get_response`` from a receipt against the
  inner ``ScriptedModel`` called directly (the floor); LangChain's ``receipt_chat_model(...)
  .invoke`` from a receipt against the same fake chat model with LangChain's own
  ``InMemoryCache`` (``set_llm_cache``) and bare (the floor). All interleaved, as in hits.py.
- In flight: 16 concurrent identical turns of a model that takes 50 ms: inner calls and wall
  time with a receipt wrapper (one call, checked), with ``InMemoryCache`` and with no cache.
- Eval suite: a two-turn agent (a tool call, then the answer) run by ``Runner.run`` over 20
  cases, 5 distinct, one after another, the model taking 20 ms a turn: a plain
  ``ScriptedModel``, ``receipt_model`` recording (cold), and a second engine replaying.

Every part has a store of its own per store (a file, or a Redis prefix deleted afterwards);
each trial of a part a scope of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from agents import Agent, ModelSettings, ModelTracing, RunConfig, Runner, function_tool
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from common import (
    SECRET,
    Config,
    Results,
    ms,
    open_engine,
    pct,
    section,
    store_dir,
    store_url,
    time_calls,
    time_calls_async,
    us,
)
from hits import REDIS_FEWER
from langchain_core.caches import InMemoryCache
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

from singleflight_agents import Singleflight
from singleflight_agents.adapters import receipt_chat_model, receipt_model

CONFIG = RunConfig(tracing_disabled=True)
INSTRUCTIONS = "Answer in one sentence."
QUESTION = "What is the weather in Oslo?"
ANSWER = "It is sunny in Oslo."
KW: dict[str, Any] = {"previous_response_id": None, "conversation_id": None, "prompt": None}
FANOUT, FANOUT_DELAY = 16, 0.05
EVAL_CASES, EVAL_CITIES, EVAL_DELAY = 20, ("Oslo", "Lima", "Pune", "Kyiv", "Quito"), 0.02


@function_tool
def lookup(city: str) -> str:
    """Look up the weather in a city.

    Args:
        city: The city.
    """
    return f"sunny in {city}"


def openai_args() -> tuple[Any, ...]:
    """One agent turn at the ``Model`` boundary: instructions, one user message, one tool."""
    return (INSTRUCTIONS, [{"role": "user", "content": QUESTION}], ModelSettings(), [lookup],
            None, [], ModelTracing.DISABLED)


class FakeChat(BaseChatModel):
    """A chat model that answers at once (or after ``delay`` seconds) with a fixed message and
    its token usage, and counts its calls (a private attribute: LangChain's cache keys the
    model's fields)."""

    model_name: str = "fake-chat-1"
    delay: float = 0.0
    _calls: int = PrivateAttr(default=0)

    @property
    def _llm_type(self) -> str:
        return "bench-fake-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def _answer(self) -> ChatResult:
        self._calls += 1
        message = AIMessage(ANSWER, usage_metadata={"input_tokens": 100, "output_tokens": 20,
                                                    "total_tokens": 120},
                            response_metadata={"model_name": self.model_name})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if self.delay:
            time.sleep(self.delay)
        return self._answer()

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._answer()


def lc_messages(question: str = QUESTION) -> list[BaseMessage]:
    return [SystemMessage(INSTRUCTIONS), HumanMessage(question)]


@contextlib.contextmanager
def llm_cache(cache: Any) -> Any:
    """LangChain's global LLM cache set to ``cache``, the previous one restored on exit."""
    previous = get_llm_cache()
    set_llm_cache(cache)
    try:
        yield cache
    finally:
        set_llm_cache(previous)


def bench_models(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    section("9. model turns: receipts against the frameworks' own caches")
    previous = get_llm_cache()
    set_llm_cache(None)  # only the InMemoryCache variants run with a global cache
    try:
        _warm_turn(cfg, res, stores)
        _in_flight(cfg, res, stores)
        _eval_suite(cfg, res, stores)
    finally:
        set_llm_cache(previous)


# -- warm turns ----------------------------------------------------------------------------


def _warm_turn(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    samples: dict[str, list[int]] = {}
    runs: list[Callable[[], None]] = []
    inner_calls: dict[str, Callable[[], int]] = {}
    with store_dir("models-warm") as tmp, contextlib.ExitStack() as stack:
        args = openai_args()
        for store in stores:
            sf = open_engine(stack.enter_context(store_url(store, tmp)))
            stack.callback(sf.close)  # before the store's keys are dropped
            n = cfg.model_iterations // (REDIS_FEWER // 2 if store == "redis" else 1)

            scripted = ScriptedModel([[assistant_message(ANSWER)]])
            wrapped = receipt_model(sf, scripted, model_name="scripted", deterministic=True)
            asyncio.run(wrapped.get_response(*args, **KW))  # record the receipt
            inner_calls[f"{store}_openai"] = lambda m=scripted: len(m.calls)
            out = samples[f"{store}_openai"] = []
            runs.append(lambda w=wrapped, n=n, out=out: asyncio.run(time_calls_async(
                lambda _arg: w.get_response(*args, **KW), 0, n, out)))

            fake = FakeChat()
            chat = receipt_chat_model(sf, fake, deterministic=True)
            chat.invoke(lc_messages())  # record the receipt
            inner_calls[f"{store}_lc"] = lambda m=fake: m._calls
            out = samples[f"{store}_lc"] = []
            runs.append(lambda c=chat, n=n, out=out: time_calls(
                lambda _arg: c.invoke(lc_messages()), 0, n, out))

        # The floor of the SDK: the scripted model itself, its steps refilled between batches
        # (each call consumes one), its record of calls cleared.
        direct = ScriptedModel()
        out = samples["openai_direct"] = []

        def run_direct(out: list[int] = out) -> None:
            direct._calls.clear()
            direct.extend([[assistant_message(ANSWER)]] * cfg.model_iterations)
            asyncio.run(time_calls_async(lambda _arg: direct.get_response(*args, **KW), 0,
                                         cfg.model_iterations, out))
        runs.append(run_direct)

        cached, cache = FakeChat(), InMemoryCache()
        with llm_cache(cache):
            cached.invoke(lc_messages())  # fill the cache
        out = samples["lc_inmemory"] = []

        def run_cached(out: list[int] = out) -> None:
            with llm_cache(cache):
                time_calls(lambda _arg: cached.invoke(lc_messages()), 0, cfg.model_iterations, out)
        runs.append(run_cached)

        bare = FakeChat()
        out = samples["lc_bare"] = []
        runs.append(lambda out=out: time_calls(lambda _arg: bare.invoke(lc_messages()), 0,
                                               cfg.model_iterations, out))

        for repeat in range(cfg.model_repeats):  # interleaved, in a rotating order
            turn = repeat % len(runs)
            for run in runs[turn:] + runs[:turn]:
                run()

        for key, count in inner_calls.items():
            res.check(count() == 1, f"9 model turns: warm {key} receipt called the inner model "
                                    f"{count()} times, not once")
        res.check(cached._calls == 1, f"9 model turns: InMemoryCache let {cached._calls} calls "
                                      f"through, not 1")

    medians = {key: statistics.median(values) for key, values in samples.items()}
    for key, median in medians.items():
        res.numbers[f"models_{key}_median_ns"] = median

    def row(key: str, label: str, store: str = "", target: str = "",
            met: bool | None = None) -> None:
        res.add("9 model turns", f"{label}: median / p99",
                f"{us(medians[key])} / {us(pct(samples[key], 0.99))}", target, met, store=store)

    floor = medians["openai_direct"]
    for store in stores:
        over = medians[f"{store}_openai"] - floor
        res.numbers[f"models_{store}_openai_overhead_ns"] = over
        if store == "sqlite":
            row(f"{store}_openai", "OpenAI Agents SDK: receipt_model get_response, warm receipt",
                store, "≤ 1 ms over the direct call", over <= 1_000_000)
        else:
            row(f"{store}_openai", "OpenAI Agents SDK: receipt_model get_response, warm receipt",
                store)
    row("openai_direct", "OpenAI Agents SDK: ScriptedModel get_response called directly (floor)")
    peer = medians["lc_inmemory"]
    for store in stores:
        over = medians[f"{store}_lc"] - medians["lc_bare"]
        res.numbers[f"models_{store}_lc_overhead_ns"] = over
        if store == "sqlite":
            row(f"{store}_lc", "LangChain: receipt_chat_model invoke, warm receipt", store,
                "≤ 1 ms over the bare model", over <= 1_000_000)
        else:
            row(f"{store}_lc", "LangChain: receipt_chat_model invoke, warm receipt", store)
    res.numbers["models_lc_inmemory_overhead_ns"] = peer - medians["lc_bare"]
    row("lc_inmemory", "LangChain: same fake model, InMemoryCache hit (set_llm_cache)")
    row("lc_bare", "LangChain: same fake model, no cache (floor)")
    try:
        import langchain_community.cache  # noqa: F401
    except ImportError:
        note = ("Benchmark 9 leaves out langchain_community's SQLiteCache, a second LangChain "
                "peer: the package is not installed here.")
        if note not in res.notes:
            res.notes.append(note)


# -- in flight -----------------------------------------------------------------------------


async def _fan_out(func: Callable[[], Any]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(func() for _ in range(FANOUT)))
    return time.perf_counter() - start


def _slow_scripted() -> ScriptedModel:
    async def slow(call: ModelCall) -> list[Any]:
        await asyncio.sleep(FANOUT_DELAY)
        return [assistant_message(ANSWER)]

    return ScriptedModel([ModelStep.respond(slow) for _ in range(FANOUT)])


def _in_flight(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    calls: dict[str, list[int]] = {}
    walls: dict[str, list[float]] = {}

    def record(key: str, count: int, wall: float) -> None:
        calls.setdefault(key, []).append(count)
        walls.setdefault(key, []).append(wall)

    args = openai_args()
    with store_dir("models-inflight") as tmp, contextlib.ExitStack() as stack:
        engines = {}
        for store in stores:
            engines[store] = open_engine(stack.enter_context(store_url(store, tmp)))
            stack.callback(engines[store].close)
        for trial in range(cfg.model_trials):
            scope = f"inflight-{trial}"
            for store, sf in engines.items():
                fake = FakeChat(delay=FANOUT_DELAY)
                chat = receipt_chat_model(sf, fake, deterministic=True, scope=scope)
                wall = asyncio.run(_fan_out(lambda c=chat: c.ainvoke(lc_messages())))
                record(f"{store}_lc", fake._calls, wall)

                scripted = _slow_scripted()
                wrapped = receipt_model(sf, scripted, model_name="scripted", deterministic=True,
                                        scope=scope)
                wall = asyncio.run(_fan_out(lambda w=wrapped: w.get_response(*args, **KW)))
                record(f"{store}_openai", len(scripted.calls), wall)

            fake = FakeChat(delay=FANOUT_DELAY)
            with llm_cache(InMemoryCache()):
                wall = asyncio.run(_fan_out(lambda f=fake: f.ainvoke(lc_messages())))
            record("lc_inmemory", fake._calls, wall)

            fake = FakeChat(delay=FANOUT_DELAY)
            wall = asyncio.run(_fan_out(lambda f=fake: f.ainvoke(lc_messages())))
            record("lc_bare", fake._calls, wall)

            scripted = _slow_scripted()
            wall = asyncio.run(_fan_out(lambda m=scripted: m.get_response(*args, **KW)))
            record("openai_direct", len(scripted.calls), wall)

    def label(counts: list[int]) -> str:
        if len(set(counts)) > 1:
            return "/".join(map(str, counts))
        return f"{counts[0]} (each of {len(counts)} trials)" if len(counts) > 1 else str(counts[0])

    def row(key: str, what: str, store: str = "", exactly_one: bool = False) -> None:
        wall = statistics.median(walls[key])
        res.numbers[f"models_inflight_{key}_wall_s"] = wall
        res.numbers[f"models_inflight_{key}_calls"] = max(calls[key])
        value = f"{label(calls[key])}; {ms(wall)} (max {ms(max(walls[key]))})"
        if exactly_one:
            ok = res.check(set(calls[key]) == {1},
                           f"9 model turns: {store} {what} made {calls[key]} inner calls for "
                           f"{FANOUT} identical concurrent turns, not 1")
            res.add("9 model turns", f"{FANOUT} concurrent identical turns, 50 ms model, {what}: "
                    "inner calls; wall (median)", value, "1 call", ok, store=store)
        else:
            res.add("9 model turns", f"{FANOUT} concurrent identical turns, 50 ms model, {what}: "
                    "inner calls; wall (median)", value, store=store)

    for store in stores:
        row(f"{store}_lc", "receipt_chat_model ainvoke", store, exactly_one=True)
    row("lc_inmemory", "InMemoryCache ainvoke")
    row("lc_bare", "no cache ainvoke")
    for store in stores:
        row(f"{store}_openai", "receipt_model get_response", store, exactly_one=True)
    row("openai_direct", "ScriptedModel get_response")


# -- an eval suite ---------------------------------------------------------------------------


def _city(call: ModelCall) -> str:
    items = call.input if isinstance(call.input, list) else [{"role": "user", "content": call.input}]
    for item in items:
        if isinstance(item, dict) and item.get("role") == "user":
            return str(item["content"]).rsplit(" ", 1)[-1].rstrip("?")
    raise AssertionError(f"no user message in {call.input!r}")


async def _eval_turn(call: ModelCall) -> list[Any]:
    """Turn 1 calls ``lookup``; turn 2, with the tool's output in the input, answers."""
    await asyncio.sleep(EVAL_DELAY)
    city = _city(call)
    if any(isinstance(item, dict) and item.get("type") == "function_call_output"
           for item in call.input):
        return [assistant_message(f"It is sunny in {city}.")]
    return [function_call("lookup", {"city": city}, call_id=f"call-{city}")]


def _eval_model(turns: int) -> ScriptedModel:
    return ScriptedModel([ModelStep.respond(_eval_turn) for _ in range(turns)])


async def _run_suite(model: Any) -> float:
    """The 20 cases one after another, as a test session runs them; the wall time."""
    agent = Agent(name="weather", instructions=INSTRUCTIONS, tools=[lookup], model=model)
    start = time.perf_counter()
    for case in range(EVAL_CASES):
        city = EVAL_CITIES[case % len(EVAL_CITIES)]
        result = await Runner.run(agent, f"What is the weather in {city}?", run_config=CONFIG)
        if result.final_output != f"It is sunny in {city}.":
            raise AssertionError(f"case {case}: {result.final_output!r}")
    return time.perf_counter() - start


def _eval_suite(cfg: Config, res: Results, stores: Sequence[str]) -> None:
    calls: dict[str, list[int]] = {}
    walls: dict[str, list[float]] = {}

    def record(key: str, count: int, wall: float) -> None:
        calls.setdefault(key, []).append(count)
        walls.setdefault(key, []).append(wall)

    with store_dir("models-eval") as tmp, contextlib.ExitStack() as stack:
        urls = {store: stack.enter_context(store_url(store, tmp)) for store in stores}
        for trial in range(cfg.model_trials):
            scope = f"eval-{trial}"
            plain = _eval_model(2 * EVAL_CASES)
            wall = asyncio.run(_run_suite(plain))
            record("plain", len(plain.calls), wall)
            for store, url in urls.items():
                with open_engine(url) as sf:
                    cold = _eval_model(2 * EVAL_CASES)
                    wall = asyncio.run(_run_suite(receipt_model(
                        sf, cold, model_name="scripted-eval", deterministic=True, scope=scope)))
                    record(f"{store}_cold", len(cold.calls), wall)
                # A second engine in replay mode: a fresh CI job.
                with Singleflight(store=url, secret=SECRET, mode="replay") as replayer:
                    warm = ScriptedModel()  # any call would raise UnexpectedModelCall
                    wall = asyncio.run(_run_suite(receipt_model(
                        replayer, warm, model_name="scripted-eval", deterministic=True,
                        scope=scope)))
                    record(f"{store}_replay", len(warm.calls), wall)

    distinct = len(EVAL_CITIES)
    expected = {"plain": 2 * EVAL_CASES, **{f"{s}_cold": 2 * distinct for s in stores},
                **{f"{s}_replay": 0 for s in stores}}
    labels = {"plain": "plain ScriptedModel", "cold": "receipt_model, recording (cold store)",
              "replay": "receipt_model, second engine in replay mode"}
    order = ["plain"] + [f"{s}_{kind}" for kind in ("cold", "replay") for s in stores]
    for key in order:
        store, _, kind = key.rpartition("_")
        wall = statistics.median(walls[key])
        res.numbers[f"models_eval_{key}_wall_s"] = wall
        res.numbers[f"models_eval_{key}_calls"] = max(calls[key])
        counts = calls[key]
        ok = set(counts) == {expected[key]}
        if store:
            res.check(ok, f"9 model turns: eval suite {store} {labels[kind]} made {counts} model "
                          f"calls, not {expected[key]}")
        count_label = (f"{counts[0]} (each of {len(counts)} trials)" if len(set(counts)) == 1
                       and len(counts) > 1 else "/".join(map(str, counts)))
        res.add("9 model turns",
                f"eval, {EVAL_CASES} sequential cases ({distinct} distinct), 2 turns each, "
                f"20 ms model, "
                f"{labels[kind]}: model calls; wall (median)",
                f"{count_label}; {ms(wall)}", f"{expected[key]} calls", ok, store=store)
