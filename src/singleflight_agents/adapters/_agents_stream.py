"""A streamed Agents SDK model turn: recorded while its first caller streams it live, relayed
from the recording to every other caller (see ``openai_models``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from functools import cache
from typing import Any

from agents.items import TResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from ._agents_compat import carry_model_timeout
from ._turns import Request, jsonable, usage_of

__all__ = ["IncompleteStreamError", "LiveStream", "relay"]


class IncompleteStreamError(RuntimeError):
    """A model's stream ended without ``response.completed``: it is not recorded."""


class LiveStream:
    """The model's own stream, for the caller that owns the turn: ``record`` passes each event
    on as it arrives and returns the recording the engine stores."""

    def __init__(self, open_stream: Callable[[], AsyncIterator[TResponseStreamEvent]],
                 tool_name: str) -> None:
        self.queue: asyncio.Queue[TResponseStreamEvent] = asyncio.Queue()
        self.ran_here = False  # set when the engine ran `record` for this caller
        self._open = open_stream
        self._tool_name = tool_name

    async def record(self, request: Request) -> dict[str, Any]:
        self.ran_here = True
        events: list[Any] = []
        plain: list[int] = []  # the events the model yielded as dicts, replayed as dicts
        usage, completed = usage_of(0, 0), False
        stream = self._open()
        try:
            async for event in stream:
                self.queue.put_nowait(event)
                if isinstance(event, Mapping):
                    plain.append(len(events))
                events.append(dump(event))
                response = getattr(event, "response", None)
                if event_type(event) == "response.completed" and response is not None:
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
            raise IncompleteStreamError(f"{self._tool_name}: the stream ended without "
                                        f"response.completed (last: {last}); not recorded")
        return {"usage": usage, "events": events, **({"plain": plain} if plain else {})}


async def relay(live: LiveStream,
                turn: asyncio.Future[Any]) -> AsyncGenerator[TResponseStreamEvent, None]:
    """The turn's events for this caller: live ones as ``record`` queues them (if the engine
    ran it here), else the recorded ones once the turn is settled; then the turn's error."""
    waiter: asyncio.Future[Any] | None = None
    delivered_completed = False
    try:
        while not turn.done() or not live.queue.empty():
            if live.queue.empty():
                waiter = asyncio.ensure_future(live.queue.get())
                await asyncio.wait({waiter, turn}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    continue
                event = waiter.result()
            else:
                event = live.queue.get_nowait()
            delivered_completed = event_type(event) == "response.completed"
            yield event
        outcome = turn.result()  # raises the turn's error after the events it streamed
        if not live.ran_here:
            plain = set(outcome.value.get("plain", ()))
            for i, recorded in enumerate(outcome.value["events"]):
                yield recorded if i in plain else _rebuilt(recorded)
    finally:
        if waiter is not None:
            waiter.cancel()  # cancelled while waiting for the next event
        if not turn.done():
            # Stopped after the whole answer: the turn is only storing it, so wait for that.
            # Stopped before: the turn is cancelled and the engine abandons it.
            if not delivered_completed:
                # Cancelled by the SDK's model timeout: the model's stream, in the turn's task,
                # records it on its span as it would in the SDK's.
                carry_model_timeout(asyncio.current_task(), turn)
                turn.cancel()
            await asyncio.wait({turn})  # a cancellation of this consumer still propagates
        if not turn.cancelled():
            turn.exception()  # retrieved: the consumer has gone


def dump(item: Any) -> Any:
    # Only the fields the model set, by their wire names: loaded back, the item dumps as the
    # original did, so the next turn's input (and key) is the same after a replay.
    if isinstance(item, Mapping):  # a model may yield its events as plain dicts
        return jsonable(item)
    return item.model_dump(mode="json", exclude_unset=True, by_alias=True)


def event_type(event: Any) -> Any:
    return event.get("type") if isinstance(event, Mapping) else getattr(event, "type", None)


def _rebuilt(recorded: dict[str, Any]) -> Any:
    """A recorded event as the OpenAI library's own event type; one it does not know (a
    provider's extension, a newer event) as the dict it was recorded as, which the SDK passes
    on as a raw event, rather than failing every replay of the turn."""
    try:
        return _stream_event_adapter().validate_python(recorded)
    except ValidationError:
        return recorded


@cache
def _stream_event_adapter() -> TypeAdapter[TResponseStreamEvent]:
    return TypeAdapter(TResponseStreamEvent)
