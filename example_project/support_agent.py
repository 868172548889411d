"""A small customer-support agent (OpenAI Agents SDK) and the model it runs on.

The agent answers order questions with one tool, ``lookup_order``, a read of the order system.
The application deduplicates it itself, with its own engine (``sf``) and ``@sf.tool``: the
agent code does not know about tests. Under pytest the plugin's session governs that engine
(the run's store, mode and report), so the eval needs nothing more for the tool.

In a real project the model is a paid one, ``OpenAIResponsesModel("gpt-4.1", AsyncOpenAI())``;
so that this example runs anywhere, ``paid_model()`` is a scripted stand-in that behaves like
one: it needs an API key, it logs every turn it is paid for, and it reports token usage per turn.
"""

from __future__ import annotations

import json
import os
import re

from agents import Agent, Model, function_tool
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from singleflight_agents import Singleflight

API_KEY_VARIABLE = "EXAMPLE_MODEL_API_KEY"
# A file the stand-in model appends a line to for every turn it is paid for (a replayed turn
# never gets there). A file, not a list in memory: with pytest-xdist the turns are paid for in
# several worker processes, and the count must be the run's. Unset: nothing is logged.
PAID_CALLS_LOG_VARIABLE = "EXAMPLE_PAID_CALLS_LOG"

# The application's engine, created at import. Alone it records to .singleflight/receipts.db;
# while a session is active (the pytest plugin starts one per test process), its calls run on
# the session's store, in the session's mode (record, replay, ...), counted in its report.
sf = Singleflight()

ORDERS = {
    "A1001": {"status": "shipped", "carrier": "UPS", "eta": "2025-06-14", "return_by": "2025-07-14"},
    "B2002": {"status": "processing", "carrier": None, "eta": "2025-06-20", "return_by": None},
    "C3003": {"status": "delivered", "carrier": "DHL", "eta": "2025-05-30", "return_by": "2025-06-29"},
}

INSTRUCTIONS = (
    "You are the support agent of an online shop. Look every order up with lookup_order before "
    "you answer, and answer from what it returns; never guess dates."
)


# A read of data that changes (bounded_read=True): identical lookups share one result for a
# day (ttl), and are recorded and replayed with the model's turns. The SDK's function_tool
# builds the tool from the decorated function as it would from the plain one.
@function_tool
@sf.tool(tool_name="support.lookup_order", bounded_read=True, ttl=86400)
def lookup_order(order_id: str) -> str:
    """Look an order up by its id (like A1001): status, carrier, delivery date, return deadline."""
    order = ORDERS.get(order_id.strip().upper())
    if order is None:
        return json.dumps({"order_id": order_id, "error": "not found"})
    return json.dumps({"order_id": order_id, **order})


def build_agent(model: Model) -> Agent:
    """The support agent on ``model`` (the paid model, or that model wrapped by receipt_model)."""
    return Agent(name="support", instructions=INSTRUCTIONS, model=model, tools=[lookup_order])


# -- the stand-in for a paid model ---------------------------------------------------------------


def paid_model() -> Model:
    """The model the agent runs on.

    A real project returns the real model here::

        from agents import OpenAIResponsesModel
        from openai import AsyncOpenAI

        return OpenAIResponsesModel("gpt-4.1", AsyncOpenAI())   # reads OPENAI_API_KEY

    This stand-in answers like that model would, from the conversation it is sent.
    """
    return ScriptedModel([ModelStep.respond(_respond) for _ in range(8)])


def _respond(call: ModelCall) -> ModelStep:
    if not os.environ.get(API_KEY_VARIABLE):
        raise RuntimeError(
            f"{API_KEY_VARIABLE} is not set: a real model would need an API key to answer this "
            f"turn (replay recorded turns with `pytest --singleflight-mode=replay`)")
    items = [call.input] if isinstance(call.input, str) else list(call.input)
    last = items[-1]
    text = json.dumps(call.input) + (call.system_instructions or "")
    prompt_tokens = 850 + len(text) // 4  # system prompt and tool schema, then ~4 characters a token
    if isinstance(last, dict) and last.get("type") == "function_call_output":
        order = json.loads(last["output"])
        answer = _answer(_question(items), order)
        _log_paid_turn("answer")
        return ModelStep(output=[assistant_message(answer, item_id=f"msg_{order['order_id']}")],
                         usage=_usage(prompt_tokens, 60), response_id=f"resp_answer_{order['order_id']}")
    match = re.search(r"\b([A-Z]\d{4})\b", _question(items).upper())
    order_id = match.group(1) if match else "unknown"
    _log_paid_turn("lookup")
    return ModelStep(
        output=[function_call("lookup_order", {"order_id": order_id}, call_id=f"call_{order_id}")],
        usage=_usage(prompt_tokens, 24), response_id=f"resp_lookup_{order_id}")


def _log_paid_turn(kind: str) -> None:
    log = os.environ.get(PAID_CALLS_LOG_VARIABLE)
    if log:
        with open(log, "a", encoding="utf-8") as handle:  # one short append: atomic
            handle.write(kind + "\n")


def paid_turns(log: str) -> int:
    """How many turns the stand-in model was paid for, by every process that logged to ``log``."""
    try:
        with open(log, encoding="utf-8") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def _question(items: list[object]) -> str:
    for item in items:
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def _answer(question: str, order: dict[str, str | None]) -> str:
    order_id = order["order_id"]
    if order.get("error"):
        return f"I couldn't find order {order_id}. Could you check the order number?"
    if "return" in question.lower():
        if order["return_by"] is None:
            return f"Order {order_id} hasn't shipped yet, so there is nothing to return; you can cancel it."
        return f"Yes: order {order_id} can be returned until {order['return_by']}."
    if order["status"] == "processing":
        return f"Order {order_id} is still being prepared; it should arrive by {order['eta']}."
    return f"Order {order_id} is {order['status']} ({order['carrier']}), delivery date {order['eta']}."


def _usage(input_tokens: int, output_tokens: int) -> Usage:
    return Usage(requests=1, input_tokens=input_tokens, output_tokens=output_tokens,
                 total_tokens=input_tokens + output_tokens)
