"""Price tables, the engine's meter (tokens and dollars spent and saved) and the report's
model section, without any framework: a plain function plays the model."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET

from singleflight_agents import Singleflight, ToolExecutionOptions
from singleflight_agents.pricing import PriceTable
from singleflight_agents.reporting import format_line, format_markdown, format_summary

PRICES = {"gpt-4.1": {"input": 2.0, "output": 8.0}}


def turn_options(model: str, **changes: Any) -> ToolExecutionOptions:
    """What the model wrappers set: tool name ``model:<name>`` and a meter over the usage."""
    table = PriceTable.load(PRICES)

    def meter(value: Any) -> tuple[int, int, float | None]:
        tokens_in, tokens_out = value["usage"]
        return tokens_in, tokens_out, table.dollars(model, tokens_in, tokens_out)

    return ToolExecutionOptions(tool_name=f"model:{model}", deterministic=True,
                                meter=meter).replace(**changes)


def answer(prompt: str) -> dict[str, Any]:
    return {"text": prompt.upper(), "usage": [1000, 200]}


# -- price tables --------------------------------------------------------------------


def test_price_table_forms_and_dollars(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"a": [1, 4], "b": {"input": 0.5, "output": 2}}))
    for table in (PriceTable.load(path), PriceTable.load(str(path)),
                  PriceTable.load({"a": (1, 4), "b": {"input": 0.5, "output": 2}})):
        assert table.dollars("a", 1_000_000, 500_000) == pytest.approx(3.0)
        assert table.dollars("b", 2_000_000, 0) == pytest.approx(1.0)
        assert table.dollars("unknown", 10, 10) is None
    assert not PriceTable.load(None)


def test_price_table_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(PRICES))
    monkeypatch.setenv("SINGLEFLIGHT_PRICES", str(path))
    assert PriceTable.load(None).dollars("gpt-4.1", 1_000_000, 0) == pytest.approx(2.0)


@pytest.mark.parametrize(("source", "message"), [
    ({"m": {"input": 1}}, "price for model 'm'"),
    ({"m": [1, -2]}, "price for model 'm'"),
    ({"m": [1, float("nan")]}, "price for model 'm'"),
    ({"m": [True, 1]}, "price for model 'm'"),
    ({"m": "cheap"}, "price for model 'm'"),
    (["gpt-4.1"], "maps model names to prices"),
])
def test_bad_price_entries_name_the_model_and_the_form(source: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        PriceTable.load(source)
    assert "\n" not in str(caught.value)


def test_bad_price_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        PriceTable.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        PriceTable.load(broken)
    with pytest.raises(ValueError, match="price for model"):
        Singleflight(tmp_path / "r.db", secret=SECRET, prices={"m": "free"})


def test_a_meter_must_be_callable() -> None:
    with pytest.raises(ValueError, match="meter must be a callable"):
        ToolExecutionOptions(meter=42)  # type: ignore[arg-type]


# -- the engine counts ---------------------------------------------------------------


def test_executions_count_spent_and_receipts_count_saved(sf: Singleflight) -> None:
    options = turn_options("gpt-4.1")
    for _ in range(3):
        assert sf.execute_sync(answer, "hi", options=options).value["text"] == "HI"
    sf.execute_sync(answer, "other", options=options)
    row = sf.summary()["tools"]["model:gpt-4.1"]
    assert (row["executed"], row["cache_hits"]) == (2, 2)
    assert (row["tokens_in"], row["tokens_out"]) == (2000, 400)
    assert (row["tokens_in_saved"], row["tokens_out_saved"]) == (2000, 400)
    one_turn = (1000 * 2.0 + 200 * 8.0) / 1e6
    assert row["dollars_spent"] == pytest.approx(2 * one_turn)
    assert row["dollars_saved"] == pytest.approx(2 * one_turn)
    assert row["unpriced"] == 0


def test_concurrent_identical_turns_run_once_and_the_rest_count_as_saved(sf: Singleflight) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(prompt: str) -> dict[str, Any]:
        started.set()
        release.wait(10)
        return answer(prompt)

    options = turn_options("gpt-4.1")

    async def main() -> list[Any]:
        first = asyncio.ensure_future(sf.execute(slow, "q", options=options))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        rest = [asyncio.ensure_future(sf.execute(slow, "q", options=options)) for _ in range(4)]
        release.set()
        return await asyncio.gather(first, *rest)

    outcomes = asyncio.run(main())
    assert sorted(o.source for o in outcomes).count("executed") == 1
    row = sf.summary()["tools"]["model:gpt-4.1"]
    assert row["tokens_in"] == 1000
    assert row["tokens_in_saved"] == 4000
    assert row["shared_waits"] + row["cache_hits"] == 4


def test_unpriced_models_are_counted_not_priced(sf: Singleflight) -> None:
    options = turn_options("local-llama")
    sf.execute_sync(answer, "hi", options=options)
    sf.execute_sync(answer, "hi", options=options)
    row = sf.summary()["tools"]["model:local-llama"]
    assert row["unpriced"] == 2
    assert row["tokens_in_saved"] == 1000
    assert row["dollars_saved"] == 0 and row["dollars_spent"] == 0


def test_a_failing_meter_warns_once_and_never_fails_the_call(sf: Singleflight) -> None:
    options = turn_options("gpt-4.1", meter=lambda value: value["no such field"])
    with pytest.warns(RuntimeWarning, match="its meter failed"):
        assert sf.execute_sync(answer, "hi", options=options).value["text"] == "HI"
    assert sf.execute_sync(answer, "hi", options=options).source == "cache_hit"
    row = sf.summary()["tools"]["model:gpt-4.1"]
    assert row["tokens_in"] == row["tokens_in_saved"] == 0


def test_mode_off_counts_duplicate_dollars_from_the_meter(store_url: str) -> None:
    options = turn_options("gpt-4.1")
    with Singleflight(store=store_url, secret=SECRET, mode="off") as engine:
        for _ in range(3):
            engine.execute_sync(answer, "hi", options=options)
        summary = engine.summary()
    assert summary["duplicates"] == 2
    assert summary["duplicate_dollars"] == pytest.approx(2 * (1000 * 2.0 + 200 * 8.0) / 1e6)
    assert summary["tokens_in"] == 3000 and summary["tokens_in_saved"] == 0


# -- the report ----------------------------------------------------------------------


def test_report_shows_tokens_and_dollars_per_model(sf: Singleflight) -> None:
    priced, unpriced = turn_options("gpt-4.1"), turn_options("local-llama")
    for _ in range(3):
        sf.execute_sync(answer, "hi", options=priced)
    for _ in range(2):
        sf.execute_sync(answer, "hi", options=unpriced)
    summary = sf.summary()
    text = format_summary(summary)
    assert "model tokens avoided: 3,000 in / 600 out ($0.0072)" in text
    assert "spent: 2,000 in / 400 out ($0.0036)" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.strip().startswith(("gpt-4.1", "local-llama"))}
    assert rows["gpt-4.1"][1:6] == ["3", "1", "2", "2,000", "400"]
    assert rows["gpt-4.1"][6:] == ["$0.0072", "$0.0036"]
    assert rows["local-llama"][6:] == ["no", "price", "no", "price"]
    assert "no price for model(s) local-llama" in text
    markdown = format_markdown(summary)
    assert "| `gpt-4.1` | 3 | 1 | 2 | 2,000 | 400 | $0.0072 | $0.0036 |" in markdown
    assert "3,000 in / 600 out model tokens avoided" in format_line(summary)


def test_report_without_model_turns_has_no_model_section(sf: Singleflight) -> None:
    sf.execute_sync(answer, "hi", options=ToolExecutionOptions(tool_name="plain", deterministic=True))
    text = format_summary(sf.summary())
    assert "model tokens" not in text and "no price" not in text


@pytest.mark.slow
def test_plugin_refuses_a_bad_price_table_in_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    pytester.path.joinpath("prices.json").write_text('{"gpt-4.1": {"in": 2}}')
    result = pytester.runpytest_subprocess("--singleflight-prices=prices.json", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*singleflight prices: price for model 'gpt-4.1' is*"])
    assert "Traceback" not in result.stderr.str()
