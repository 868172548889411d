"""The FAQ bot's eval on Anthropic: every case through Messages, a JSON answer and the SDK's
stream helper.

As in ``test_openai_eval.py``, nothing here mentions receipts: ``singleflight_http`` routes the
SDK's requests through them. Record once with ``ANTHROPIC_API_KEY`` set; replay without it.
"""

from __future__ import annotations

import pytest
from faq_bot import ask_claude, ask_claude_streamed

# Six cases, four distinct questions (two asked twice). The stand-in provider answers
# "echo: <the question>"; with a real model, each case names what the answer must say.
CASES = [
    pytest.param("How long does delivery take?", "delivery take", id="delivery"),
    pytest.param("How long does delivery take?", "delivery take", id="delivery-retry"),
    pytest.param("Can I pay with PayPal?", "pay with PayPal", id="payment"),
    pytest.param("Can I pay with PayPal?", "pay with PayPal", id="payment-rerun"),
    pytest.param("Do you have gift cards?", "gift cards", id="gift-cards"),
    pytest.param("How do I cancel an order?", "cancel an order", id="cancel"),
]


@pytest.mark.parametrize(("question", "must_say"), CASES)
def test_message(question: str, must_say: str) -> None:
    assert must_say in ask_claude(question)


@pytest.mark.parametrize(("question", "must_say"), CASES)
def test_message_streamed(question: str, must_say: str) -> None:
    assert must_say in ask_claude_streamed(question)
