"""The FAQ bot's eval on OpenAI: every case through Chat Completions (a JSON answer and a
stream) and through the Responses API.

Nothing here, nor in ``faq_bot.py``, mentions receipts: ``singleflight_http`` in ``pytest.ini``
(or ``--singleflight-http=HOST``) routes the SDK's requests to that host through them. Record
once with ``OPENAI_API_KEY`` set (``--singleflight-mode=record``); a repeated question is then
served from the first one's receipt, or shares its request while in flight; a replay
(``--singleflight-mode=replay``) needs no key and sends no request.
"""

from __future__ import annotations

import pytest
from faq_bot import ask_chat, ask_chat_streamed, ask_responses

# Six cases, four distinct questions: two are asked twice, as retries and reruns do. Each case
# names what its answer must say. The stand-in provider this example runs on answers
# "echo: <the question>", so here that comes from the question; with a real model it is the
# fact the answer has to get right ("30 days", "yes, to Canada").
CASES = [
    pytest.param("How do I reset my password?", "reset my password", id="password"),
    pytest.param("How do I reset my password?", "reset my password", id="password-retry"),
    pytest.param("Do you ship to Canada?", "ship to Canada", id="shipping"),
    pytest.param("Do you ship to Canada?", "ship to Canada", id="shipping-rerun"),
    pytest.param("What is your refund policy?", "refund policy", id="refunds"),
    pytest.param("Can I change my delivery address?", "delivery address", id="address"),
]


@pytest.mark.parametrize(("question", "must_say"), CASES)
def test_chat_completion(question: str, must_say: str) -> None:
    assert must_say in ask_chat(question)


@pytest.mark.parametrize(("question", "must_say"), CASES)
def test_chat_completion_streamed(question: str, must_say: str) -> None:
    assert must_say in ask_chat_streamed(question)


@pytest.mark.parametrize(("question", "must_say"), CASES)
def test_responses(question: str, must_say: str) -> None:
    assert must_say in ask_responses(question)
