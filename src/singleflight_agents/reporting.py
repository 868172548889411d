"""Renderings of a summary dict (see ``Singleflight.summary``): text, Markdown, JSON."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .models import MODEL_PREFIX

if TYPE_CHECKING:
    from .pricing import PriceTable

_BAR = 20


def _bar(share: float) -> str:
    filled = round(share * _BAR)
    return "█" * filled + "·" * (_BAR - filled)


def _warnings(summary: dict[str, Any], prices: PriceTable | None = None) -> list[str]:
    notes = []
    if summary.get("tampered"):
        notes.append(f"{summary['tampered']} receipt(s) failed their signature check (tampered, or "
                     f"signed with another key) and were not served (run `singleflight-agents "
                     f"verify`)")
    if summary.get("not_persisted"):
        notes.append(f"{summary['not_persisted']} result(s) could not be stored (not JSON-able)")
    if summary.get("fallbacks"):
        notes.append(f"{summary['fallbacks']} call(s) executed without sharing (store failed or "
                     f"wait timed out)")
    if summary.get("fenced_out"):
        notes.append(f"{summary['fenced_out']} result(s) lost their lease while running")
    unpriced = [name.removeprefix(MODEL_PREFIX) for name, row in summary.get("tools", {}).items()
                if row.get("unpriced")]
    if unpriced:
        notes.append(f"no price for model(s) {', '.join(unpriced)}{_searched(unpriced, prices)}: "
                     f"their dollars are not counted (give prices with --singleflight-prices or "
                     f"Singleflight(prices=...))")
    if summary.get("replay_misses"):
        notes.append(f"{summary['replay_misses']} call(s) had no receipt to replay (those tests "
                     f"failed; record them with --singleflight-mode=record)")
    return notes


def _searched(unpriced: list[str], prices: PriceTable | None) -> str:
    """Where the unpriced models were looked for, when the table says none has a price
    (rows are counted when the turns ran, perhaps with other prices: never assumed)."""
    if prices is None or any(prices.source(model) for model in unpriced):
        return ""
    catalog = prices.catalog
    return f" (neither in your table nor in {catalog})" if catalog else " (not in your table)"


def _prices_line(summary: dict[str, Any], prices: PriceTable | None) -> list[str]:
    """Which source priced each model, as the report's table sees it now."""
    if prices is None:
        return []
    sources = [f"{model} ({source})" for model in _models(summary)
               if (source := prices.source(model)) is not None]
    return [f"  prices: {', '.join(sources)}"] if sources else []


def _amount(amount: float, places: int = 2) -> str:
    """``amount`` in ``places`` decimals, or as many as its first digit needs (a model turn
    can cost a thousandth of a cent): a saving is never shown as zero."""
    if 0 < amount < 0.5 * 10 ** -places:
        places = min(10, 1 - math.floor(math.log10(amount)))
    return f"{amount:,.{places}f}"


def _usd(amount: float, places: int = 2) -> str:
    return "$" + _amount(amount, places)


def _row_usd(row: dict[str, Any], name: str) -> str:
    return "no price" if row.get("unpriced") and not row[name] else _usd(row[name], 4)


def _models(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name.removeprefix(MODEL_PREFIX): row for name, row in summary.get("tools", {}).items()
            if name.startswith(MODEL_PREFIX)}


def _tokens_line(summary: dict[str, Any], models: dict[str, dict[str, Any]]) -> str:
    # dollars_saved in the totals includes tools' estimated costs: add up the models' own.
    avoided = sum(row["dollars_saved"] for row in models.values())
    return (f"model tokens avoided: {summary['tokens_in_saved']:,} in / "
            f"{summary['tokens_out_saved']:,} out ({_usd(avoided, 4)}); "
            f"spent: {summary['tokens_in']:,} in / {summary['tokens_out']:,} out "
            f"({_usd(summary['dollars_spent'], 4)})")


def _off_line(summary: dict[str, Any]) -> str:
    return (f"mode off: {summary['duplicates']} duplicate call(s) ran that sharing would have "
            f"avoided ({_usd(summary['duplicate_dollars'])})")


def format_line(summary: dict[str, Any], mode: str | None = None) -> str:
    """The report in one line (for ``pytest -q``)."""
    where = f" [{mode}, {summary['db_path']}]" if mode else f" [{summary['db_path']}]"
    if mode == "off":
        return "singleflight: " + _off_line(summary) + where
    line = (f"singleflight: {summary['calls']} calls, {summary['unique_executions']} executed, "
            f"{summary['avoided_calls']} avoided, saved {_usd(summary['dollars_saved'])} and "
            f"{summary['latency_saved_ms'] / 1000:.1f} s")
    if _models(summary):
        line += (f", {summary['tokens_in_saved']:,} in / {summary['tokens_out_saved']:,} out "
                 f"model tokens avoided")
    warnings = len(_warnings(summary))
    return line + (f", {warnings} warning(s)" if warnings else "") + where


def format_summary(summary: dict[str, Any], mode: str | None = None, *,
                   prices: PriceTable | None = None) -> str:
    """A terminal report: totals, one row per tool with a bar of calls avoided, warnings.
    With ``prices``, the model section also names the source that prices each model."""
    lines = [
        f"singleflight summary - {f'mode {mode} - ' if mode else ''}run "
        f"{summary.get('run_id') or 'all'} - store {summary['db_path']}",
        f"  {summary['calls']} calls, {summary['unique_executions']} executed, "
        f"{summary['cache_hits']} served from receipts, {summary['shared_waits']} shared in "
        f"flight, {summary['unshared']} unshared; saved {_usd(summary['dollars_saved'])} and "
        f"{summary['latency_saved_ms'] / 1000:.1f} s",
    ]
    if summary.get("fallbacks") or summary.get("raised"):  # the rest of the calls, so they add up
        lines.append(f"  and {summary.get('fallbacks', 0)} run without sharing after a failed "
                     f"store or wait, {summary.get('raised', 0)} raised (tool errors, replay "
                     f"misses, cancellations)")
    if summary["latency_saved_ms"]:
        lines.append("  (saved s: the recorded run time of the executions avoided, added up; "
                     "not wall-clock time)")
    tools = summary.get("tools", {})
    if tools:
        name_width = max(4, *(len(name) for name in tools))
        lines.append("")
        lines.append(f"  {'tool':<{name_width}}  calls  exec  hits  shared  saved $  saved s  "
                     f"avoided")
        for name, row in tools.items():
            share = row["avoided_calls"] / row["calls"] if row["calls"] else 0.0
            lines.append(
                f"  {name:<{name_width}}  {row['calls']:>5}  {row['executed']:>4}  "
                f"{row['cache_hits']:>4}  {row['shared_waits']:>6}  {_amount(row['dollars_saved']):>7}  "
                f"{row['latency_saved_ms'] / 1000:>7.1f}  {_bar(share)} {share:>4.0%}"
            )
    else:
        lines.append("  no calls recorded")
    lines.extend(_model_rows(summary))
    lines.extend(_prices_line(summary, prices))
    if mode == "off" or summary.get("duplicates"):
        lines.append("  " + _off_line(summary))
    lines.extend(f"  warning: {note}" for note in _warnings(summary, prices))
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any], mode: str | None = None) -> str:
    """The same report as a Markdown table (for CI step summaries)."""
    lines = [
        f"### singleflight summary{f' ({mode})' if mode else ''}",
        "",
        f"{summary['calls']} calls, {summary['unique_executions']} executed, "
        f"{summary['avoided_calls']} avoided; saved **{_usd(summary['dollars_saved'])}** and "
        f"**{summary['latency_saved_ms'] / 1000:.1f} s**.",
        "",
        "| tool | calls | executed | from receipts | shared in flight | saved $ | saved s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.get("tools", {}).items():
        lines.append(f"| `{name}` | {row['calls']} | {row['executed']} | {row['cache_hits']} | "
                     f"{row['shared_waits']} | {_amount(row['dollars_saved'])} | "
                     f"{row['latency_saved_ms'] / 1000:.1f} |")
    models = _models(summary)
    if models:
        lines += ["", _tokens_line(summary, models) + ".", "",
                  "| model | turns | executed | avoided | tokens in avoided | tokens out avoided "
                  "| $ avoided | $ spent |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in models.items():
            lines.append(f"| `{name}` | {row['calls']} | {row['executed']} | {row['avoided_calls']} "
                         f"| {row['tokens_in_saved']:,} | {row['tokens_out_saved']:,} "
                         f"| {_row_usd(row, 'dollars_saved')} | {_row_usd(row, 'dollars_spent')} |")
    lines.extend(f"\n> warning: {note}" for note in _warnings(summary))
    return "\n".join(lines) + "\n"


def _model_rows(summary: dict[str, Any]) -> list[str]:
    """The model turns: tokens and dollars avoided and spent, per model."""
    models = _models(summary)
    if not models:
        return []
    width = max(5, *(len(name) for name in models))
    lines = ["", "  " + _tokens_line(summary, models),
             f"  {'model':<{width}}  turns  exec  avoided  tokens in avoided  tokens out avoided"
             f"  $ avoided    $ spent"]
    for name, row in models.items():
        lines.append(
            f"  {name:<{width}}  {row['calls']:>5}  {row['executed']:>4}  {row['avoided_calls']:>7}  "
            f"{row['tokens_in_saved']:>17,}  {row['tokens_out_saved']:>18,}  "
            f"{_row_usd(row, 'dollars_saved'):>9}  {_row_usd(row, 'dollars_spent'):>9}")
    return lines


def format_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True)


def write_report(path: str | os.PathLike[str], summary: dict[str, Any], mode: str) -> None:
    """``summary`` as a file: JSON for a ``.json`` name, else Markdown; folders created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".json":
        target.write_text(format_json({"mode": mode, **summary}))
    else:
        target.write_text(format_markdown(summary, mode))


def append_step_summary(summary: dict[str, Any], mode: str) -> None:
    """Add the Markdown report to the GitHub Actions job summary, when there is one."""
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a") as handle:
            handle.write(format_markdown(summary, mode))
