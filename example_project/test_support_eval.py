"""The support agent's eval: each case asks a question and checks the final answer.

Every model turn goes through ``receipt_model``: recorded once (``--singleflight-mode=record``),
shared by every case that sends the same turn, and replayed without a model or an API key
(``--singleflight-mode=replay``). The agent's ``lookup_order`` tool needs nothing here: the
application deduplicates it with its own engine (``@sf.tool`` in ``support_agent.py``), and the
plugin's session governs that engine, so its calls are recorded and replayed the same way, in
the mode of the run.
"""

from __future__ import annotations

import pytest
from agents import RunConfig, Runner
from support_agent import build_agent, paid_model

from singleflight_agents.adapters import receipt_model

# Recorded turns are served for a day in record mode (replay ignores expiry).
pytestmark = pytest.mark.singleflight(ttl=86400)

CASES = [
    pytest.param("Where is my order A1001?", "is shipped (UPS), delivery date 2025-06-14", id="status"),
    pytest.param("Where is my order A1001?", "is shipped (UPS), delivery date 2025-06-14",
                 id="status-retry"),
    pytest.param("Can I return order C3003?", "can be returned until 2025-06-29", id="return"),
    pytest.param("Can I return order C3003?", "can be returned until 2025-06-29", id="return-rerun"),
    pytest.param("When will order B2002 arrive?", "should arrive by 2025-06-20", id="eta-processing"),
    pytest.param("Where is order Z9999?", "couldn't find order Z9999", id="unknown-order"),
]


@pytest.mark.parametrize(("question", "expected"), CASES)
async def test_support_answer(singleflight, question, expected):
    # paid_model() is where your real model goes (OpenAIResponsesModel("gpt-4.1", client)); with
    # a real model, model_name= may be left out: it defaults to the model's own name.
    model = receipt_model(singleflight, paid_model(), model_name="gpt-4.1", deterministic=True)
    agent = build_agent(model)

    result = await Runner.run(agent, question, run_config=RunConfig(tracing_disabled=True))

    assert expected in result.final_output
    # The app's own tool went through the run's session too: this test's calls include the
    # one lookup the agent made (executed, or served from a receipt).
    lookups = [o for o in singleflight.outcomes if o.tool_name == "support.lookup_order"]
    assert len(lookups) == 1, singleflight.outcomes
