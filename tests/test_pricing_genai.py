"""genai-prices as the price source behind the user's table: it prices the models the table
does not, the table wins where both do, the report says which source priced what, and the
library does without it (not installed, or switched off) and never fetches prices."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET

from singleflight_agents import Singleflight, ToolExecutionOptions
from singleflight_agents.pricing import ENV_GENAI_PRICES, PriceTable
from singleflight_agents.reporting import format_line, format_summary

genai_prices = pytest.importorskip("genai_prices")
CATALOG = f"genai-prices {genai_prices.__version__}"
MINE = {"gpt-4.1": {"input": 1.0, "output": 1.0}}


def catalog_dollars(model: str, tokens_in: int, tokens_out: int, provider: str | None = None) -> float:
    usage = genai_prices.Usage(input_tokens=tokens_in, output_tokens=tokens_out)
    return float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)


@pytest.fixture(autouse=True)
def catalog_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_GENAI_PRICES, raising=False)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any connection attempt fails the test: prices come from the installed package."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not [t for t in threading.enumerate() if t.name.startswith("genai_prices")]


# -- the table and the catalogue -----------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o", "claude-3-5-sonnet-latest", "gemini-2.0-flash"])
def test_genai_prices_prices_models_the_table_lacks(model: str) -> None:
    table = PriceTable.load(MINE)
    expected = catalog_dollars(model, 1_000_000, 1_000_000)
    assert expected > 0
    assert table.dollars(model, 1_000_000, 1_000_000) == pytest.approx(expected)
    assert table.source(model) == CATALOG
    assert table.catalog == CATALOG


def test_gpt_4o_costs_what_openai_charges() -> None:
    # The snapshot's list price ($2.50 in, $10 out per million): a check that its units are
    # dollars per token counted, as ours are.
    assert PriceTable().dollars("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(12.5)


def test_the_table_overrides_the_catalogue() -> None:
    table = PriceTable.load({"gpt-4o": {"input": 1.0, "output": 2.0}, **MINE})
    assert table.dollars("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert table.source("gpt-4o") == table.source("gpt-4.1") == "your table"
    assert PriceTable().source("gpt-4.1") == CATALOG  # genai-prices knows it too


def test_a_model_neither_knows_is_unpriced() -> None:
    table = PriceTable.load(MINE)
    for model in ("local-llama", "", "gpt-4o" + "x" * 300, "\x00"):
        assert table.dollars(model, 1000, 100) is None
        assert table.source(model) is None


def test_the_provider_hint_narrows_and_falls_back_to_the_name() -> None:
    table = PriceTable()
    assert table.dollars("gpt-4o", 1_000_000, 0, provider="azure") == pytest.approx(
        catalog_dollars("gpt-4o", 1_000_000, 0, "azure"))
    assert table.dollars("gemini-2.0-flash", 1000, 1000, provider="google") == pytest.approx(
        catalog_dollars("gemini-2.0-flash", 1000, 1000))
    # Not under that provider, or a provider it does not know: the model's name decides.
    for provider in ("openai", "my-gateway"):
        assert table.dollars("claude-3-5-sonnet-latest", 1000, 1000, provider=provider) == (
            pytest.approx(catalog_dollars("claude-3-5-sonnet-latest", 1000, 1000)))
        assert table.source("claude-3-5-sonnet-latest", provider=provider) == CATALOG
    assert table.dollars("local-llama", 1, 1, provider="openai") is None


def test_each_turn_is_priced_by_its_size_not_a_cached_rate() -> None:
    # Long prompts cost more per token on some models: the catalogue prices every turn.
    table = PriceTable()
    for tokens_in in (1_000, 300_000):
        assert table.dollars("gemini-2.5-pro", tokens_in, 1_000) == pytest.approx(
            catalog_dollars("gemini-2.5-pro", tokens_in, 1_000))
    assert table.dollars("gpt-4o", 0, 0) == 0


def test_the_switch_turns_genai_prices_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("0", "false", "No", " off "):
        monkeypatch.setenv(ENV_GENAI_PRICES, value)
        table = PriceTable.load(MINE)
        assert table.dollars("gpt-4o", 1000, 1000) is None
        assert table.source("gpt-4o") is None and table.catalog is None
        assert table.dollars("gpt-4.1", 1_000_000, 0) == pytest.approx(1.0)
    monkeypatch.setenv(ENV_GENAI_PRICES, "1")
    assert PriceTable().source("gpt-4o") == CATALOG


def test_without_genai_prices_the_table_alone_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    PriceTable().dollars("gpt-4o", 1, 1)  # a lookup cached while it was importable
    monkeypatch.setitem(sys.modules, "genai_prices", None)  # import genai_prices now fails
    table = PriceTable.load(MINE)
    assert table.dollars("gpt-4o", 1000, 1000) is None
    assert table.source("gpt-4o") is None and table.catalog is None
    assert table.source("gpt-4.1") == "your table"
    assert table.dollars("gpt-4.1", 1_000_000, 1_000_000) == pytest.approx(2.0)
    assert not PriceTable() and table  # bool: the table's own prices, as before


def test_importing_the_library_does_not_import_genai_prices(tmp_path: Path) -> None:
    code = ("import sys\n"
            "import singleflight_agents, singleflight_agents.pricing, singleflight_agents.reporting\n"
            "from singleflight_agents.pricing import PriceTable\n"
            "table = PriceTable.load({'m': [1, 1]})\n"
            "assert table.dollars('m', 1, 1) and table.source('m') == 'your table'\n"
            "assert 'genai_prices' not in sys.modules, 'imported too early'\n"
            "assert table.source('gpt-4o').startswith('genai-prices')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr


# -- the report ----------------------------------------------------------------------------


def answer(prompt: str) -> dict[str, Any]:
    return {"text": prompt.upper(), "usage": [1000, 200]}


def run_turns(engine: Singleflight, *models: str) -> dict[str, Any]:
    """Two identical turns per model, metered as the model wrappers do, with the engine's table."""
    for model in models:
        def meter(value: Any, model: str = model) -> tuple[int, int, float | None]:
            tokens_in, tokens_out = value["usage"]
            return tokens_in, tokens_out, engine.prices.dollars(model, tokens_in, tokens_out)

        options = ToolExecutionOptions(tool_name=f"model:{model}", deterministic=True, meter=meter)
        for _ in range(2):
            engine.execute_sync(answer, "hi", options=options)
    return engine.summary()


def test_the_report_names_each_models_price_source(tmp_path: Path) -> None:
    with Singleflight(tmp_path / "r.db", secret=SECRET, prices=MINE) as engine:
        summary = run_turns(engine, "gpt-4.1", "gpt-4o", "local-llama")
        text = format_summary(summary, prices=engine.prices)
    tools = summary["tools"]
    assert tools["model:gpt-4o"]["unpriced"] == 0
    assert tools["model:gpt-4o"]["dollars_spent"] == pytest.approx(catalog_dollars("gpt-4o", 1000, 200))
    assert tools["model:gpt-4.1"]["dollars_spent"] == pytest.approx(1200 / 1e6)
    assert f"  prices: gpt-4.1 (your table), gpt-4o ({CATALOG})" in text.splitlines()
    warning = [line for line in text.splitlines() if "no price for model(s)" in line]
    assert len(warning) == 1 and "model(s) local-llama (neither in your table nor in " \
        f"{CATALOG}): their dollars are not counted" in warning[0]
    assert "gpt-4o" not in warning[0] and "gpt-4.1" not in warning[0]
    # Without prices= the report is as before: no prices line, the plain warning.
    plain = format_summary(summary)
    assert "prices:" not in plain and "no price for model(s) local-llama: their" in plain
    def rest(report: str) -> list[str]:
        return [line for line in report.splitlines()
                if not line.startswith(("  prices:", "  warning: no price for"))]

    assert rest(plain) == rest(text)
    assert "1 warning(s)" in format_line(summary)


def test_the_report_with_genai_prices_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_GENAI_PRICES, "0")
    with Singleflight(tmp_path / "r.db", secret=SECRET, prices=MINE) as engine:
        summary = run_turns(engine, "gpt-4.1", "gpt-4o")
        text = format_summary(summary, prices=engine.prices)
    assert "  prices: gpt-4.1 (your table)" in text.splitlines()
    assert "no price for model(s) gpt-4o (not in your table): their dollars" in text


def test_the_report_without_model_turns_has_no_prices_line(tmp_path: Path) -> None:
    with Singleflight(tmp_path / "r.db", secret=SECRET) as engine:
        engine.execute_sync(answer, "hi", options=ToolExecutionOptions(tool_name="plain",
                                                                       deterministic=True))
        text = format_summary(engine.summary(), prices=engine.prices)
    assert "prices:" not in text and "no price" not in text
