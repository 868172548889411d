"""What the model wrappers share: the opt-in, the options of a model turn, and its meter.

A model turn goes through the engine like a tool call. Its tool name is ``model:<name>``;
the engine calls ``run(request)``, where ``request`` is the JSON the framework adapter built
from everything that decides the answer (so it is the key); and the value it stores is JSON:
``{"usage": {"input_tokens": n, "output_tokens": m}, ...}`` plus the adapter's own fields.
This module imports no framework.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from ..codec import canonical_json
from ..engine import Singleflight
from ..models import MODEL_PREFIX, ExecutionOutcome, ToolExecutionOptions
from ..pricing import PriceTable

Request = dict[str, Any]


class Executor(Protocol):
    """A :class:`Singleflight` engine, or the pytest plugin's ``singleflight`` fixture."""

    async def do(self, tool_name: str, identity: Any, fn: Callable[[], Any], /, *,
                 options: ToolExecutionOptions | None = None) -> ExecutionOutcome: ...

    def do_sync(self, tool_name: str, identity: Any, fn: Callable[[], Any], /, *,
                options: ToolExecutionOptions | None = None) -> ExecutionOutcome: ...


class Turns:
    """Runs the turns of one wrapped model through the engine (or the pytest fixture)."""

    def __init__(self, sf: Executor, model_name: str, options: Mapping[str, Any], *,
                 wrapper: str, model: object) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise TypeError(f"{wrapper}() needs model_name=: the name this model's turns are "
                            f"keyed, reported and priced by (got {model_name!r})")
        options = dict(options)
        prices = options.pop("prices", None)
        for fixed in ("tool_name", "meter", "estimated_cost_usd", "cost"):
            if fixed in options:
                raise TypeError(f"{wrapper}() sets {fixed} itself (turns are priced from the price "
                                f"table); it cannot be given")
        fixture_options = getattr(sf, "options", None)
        if callable(fixture_options):  # the plugin's marker and hooks apply
            base: ToolExecutionOptions = fixture_options(model, **options)
            engine: Singleflight = sf.engine  # type: ignore[attr-defined]
        elif isinstance(sf, Singleflight):
            base = ToolExecutionOptions().replace(**options)
            engine = sf
        else:
            raise TypeError(f"{wrapper}() expected a Singleflight engine or the singleflight "
                            f"fixture, got {type(sf).__name__}")
        # Without prices= here, the table is the run's (the session's while one is active).
        table = None if prices is None else PriceTable.load(prices)
        self.model_name = model_name
        # The marker's cost= is for tools: turns are priced from the table, by their usage.
        self.tool_name = MODEL_PREFIX + model_name
        self.options = base.replace(tool_name=self.tool_name, estimated_cost_usd=0.0,
                                    meter=_meter(table, engine, model_name), key=None)
        self.unshared = self.options.replace(deterministic=False, bounded_read=False)
        self.user_key = base.key
        self.engine = engine
        self._sf = sf

    async def run(self, call: Callable[[Request], Awaitable[dict[str, Any]]], request: Request, *,
                  stream: bool = False, shared: bool = True) -> ExecutionOutcome:
        """Run ``call(request)`` as this model's turn, keyed on ``request`` (and whether it is a
        stream, which no ``key=`` can drop); ``shared=False`` runs it every time."""
        options = self.options if shared else self.unshared
        return await self._sf.do(self.tool_name, self._identity(request, stream),
                                 functools.partial(call, request), options=options)

    def run_sync(self, call: Callable[[Request], dict[str, Any]], request: Request) -> ExecutionOutcome:
        return self._sf.do_sync(self.tool_name, self._identity(request, False),
                                functools.partial(call, request), options=self.options)

    def _identity(self, request: Request, stream: bool) -> Any:
        return turn_identity(request, stream, self.user_key)


def turn_identity(request: Request, stream: bool, user_key: Callable[..., Any] | None) -> Any:
    """What a turn is keyed on: the request (or what ``key=`` makes of it) with its numbers as
    JSON sees them; a stream is never the same turn as a plain call."""
    keyed = {"request": json_numbers(user_key(request) if user_key is not None else request)}
    return {**keyed, "stream": True} if stream else keyed


def json_numbers(value: Any) -> Any:
    """``1.0`` as ``1``, inside dicts and lists: the provider receives the same JSON number."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_numbers(v) for v in value]
    return value


# Request settings that steer how a request is cached, retried or timed out, never what the model
# answers: keying them would split receipts of one question. The Agents SDK's runner, for one,
# adds a prompt_cache_key generated per run, which would turn every replay into a miss.
ANSWER_NEUTRAL = frozenset({"prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                            "retry", "timeout"})
# Where frameworks pass request fields to the provider as they are.
PASS_THROUGH = ("extra_args", "extra_body", "model_kwargs")


def without_hints(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` for a key: without the fields in ``ANSWER_NEUTRAL``, at its top level and
    in its pass-through dicts (``extra_args``, ``extra_body``, ``model_kwargs``), an empty one
    as ``None`` (either sends nothing)."""
    kept = {k: v for k, v in settings.items() if k not in ANSWER_NEUTRAL}
    for name in PASS_THROUGH:
        extra = kept.get(name)
        if isinstance(extra, Mapping):
            kept[name] = {k: v for k, v in extra.items() if k not in ANSWER_NEUTRAL} or None
    return kept


def usage_of(tokens_in: int | None, tokens_out: int | None) -> dict[str, int]:
    return {"input_tokens": int(tokens_in or 0), "output_tokens": int(tokens_out or 0)}


def _meter(table: PriceTable | None, engine: Singleflight,
           model_name: str) -> Callable[[Any], tuple[int, int, float | None]]:
    def meter(value: Any) -> tuple[int, int, float | None]:
        usage = value["usage"]
        tokens_in, tokens_out = int(usage["input_tokens"]), int(usage["output_tokens"])
        prices = table if table is not None else engine.current_prices()
        return tokens_in, tokens_out, prices.dollars(model_name, tokens_in, tokens_out)

    return meter


def setting(value: Any) -> Any:
    """A model's or a hosted tool's setting for the key: each part the codec cannot encode (a
    client the model never sees) by its type, a secret as ``<secret>`` (a rotated key gives
    the same answers)."""
    if type(value).__name__ in ("SecretStr", "SecretBytes"):
        return "<secret>"
    value = jsonable(value)
    if isinstance(value, dict):
        return {k: setting(v) for k, v in value.items()}
    if isinstance(value, list):
        return [setting(v) for v in value]
    try:
        canonical_json(value)
    except TypeError:
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return value


def jsonable(value: Any) -> Any:
    """``value`` for a key: pydantic models dumped, dataclasses as dicts, classes and
    functions by their qualified name (never a repr: addresses change every run); anything
    else as it is, for the engine's encoder, which keys bytes, sets, datetimes and the like
    exactly and refuses what it cannot encode with a ``TypeError`` naming where it sits."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, type) or inspect.isroutine(value):
        return f"<{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}>"
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return jsonable(dump(mode="json", exclude_none=True))
    if dataclasses.is_dataclass(value):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not callable(getattr(value, f.name))}
    return value
