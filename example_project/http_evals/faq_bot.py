"""A shop's FAQ bot: a question in, a short answer out, from OpenAI or Anthropic models.

The application as it would be written without tests in mind: plain ``openai.OpenAI`` and
``anthropic.Anthropic`` clients, default transports, nothing about receipts. Each client reads
its API key from the usual variable (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``) and its base URL
from the SDK's own (``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL``; unset, the real API). Under
pytest with ``singleflight_http`` naming the provider's host, every request these clients send
goes through receipts: recorded once, shared, replayed.
"""

from __future__ import annotations

import functools
import os

import anthropic
import openai
from openai.types.chat import ChatCompletionMessageParam

INSTRUCTIONS = "You answer our customers' questions about the shop in one or two sentences."
CHAT_MODEL = "gpt-4o"
RESPONSES_MODEL = "gpt-4.1-mini"
CLAUDE_MODEL = "claude-sonnet-4-5"
MAX_TOKENS = 256


# The SDKs refuse to build a client without a key. A replay run serves every answer from a
# receipt: no request leaves the process, so no key is needed, and none is given; the
# placeholder only lets the client be built. Recording without a key fails at the provider
# (401), and a failed answer is never stored.
@functools.cache
def openai_client() -> openai.OpenAI:
    return openai.OpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "unset")


@functools.cache
def anthropic_client() -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=os.environ.get("ANTHROPIC_API_KEY") or "unset")


def _messages(question: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": question}]


def ask_chat(question: str) -> str:
    """Chat Completions, one JSON answer."""
    reply = openai_client().chat.completions.create(model=CHAT_MODEL, messages=_messages(question))
    return reply.choices[0].message.content or ""


def ask_chat_streamed(question: str) -> str:
    """Chat Completions, streamed (server-sent events), with the usage in the last chunk."""
    stream = openai_client().chat.completions.create(
        model=CHAT_MODEL, messages=_messages(question), stream=True,
        stream_options={"include_usage": True})
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices).strip()


def ask_responses(question: str) -> str:
    """The Responses API."""
    return openai_client().responses.create(model=RESPONSES_MODEL, instructions=INSTRUCTIONS,
                                            input=question).output_text


def ask_claude(question: str) -> str:
    """Anthropic Messages, one JSON answer."""
    message = anthropic_client().messages.create(
        model=CLAUDE_MODEL, max_tokens=MAX_TOKENS, system=INSTRUCTIONS,
        messages=[{"role": "user", "content": question}])
    return "".join(block.text for block in message.content if block.type == "text")


def ask_claude_streamed(question: str) -> str:
    """Anthropic Messages through the SDK's stream helper."""
    with anthropic_client().messages.stream(
            model=CLAUDE_MODEL, max_tokens=MAX_TOKENS, system=INSTRUCTIONS,
            messages=[{"role": "user", "content": question}]) as stream:
        return stream.get_final_text()
