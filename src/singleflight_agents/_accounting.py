"""What a call counts in the run's statistics: hits, runs, savings, tokens and dollars."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._call import Call, Result
from ._drive import running_loop
from ._platform import host_name
from .flights import store_thread
from .models import ExecutionOutcome, Source

if TYPE_CHECKING:
    from .engine import Singleflight
    from .stats import Stats
    from .store import ReceiptStore

FLUSH_INTERVAL = 1.0
_SAVED = (Source.CACHE_HIT, Source.SHARED_WAIT)
# The warning topic of a result its flight's callers could not share (used once, or not
# copyable): told apart from the store's warnings about the same tool.
UNSHAREABLE = "unshareable:"


def finish(sf: Singleflight, call: Call, result: Result, started: float) -> ExecutionOutcome:
    """Count the call and tell its session; its outcome."""
    source = result.source
    counters: dict[str, float] = {"calls": 1, "tampered": int(call.tampered)}
    if source in _SAVED:
        counters["cache_hits" if source is Source.CACHE_HIT else "shared_waits"] = 1
        counters["dollars_saved"] = call.options.estimated_cost_usd
        counters["latency_saved_ms"] = result.latency_ms
    elif source is Source.EXECUTED_UNSHARED:
        counters["unshared"] = 1
    if call.options.meter is not None:
        _count_usage(sf, call, call.options.meter, result, counters)
    sf._stats.add_all(call.tool_name, counters)
    if time.monotonic() - sf._last_flush > FLUSH_INTERVAL:  # batched: at most 1 write/s
        sf._last_flush = time.monotonic()
        if sf._backend is not None and running_loop() is not None:
            store_thread(_flush, sf)  # no event loop waits for the statistics
        else:  # (the first flush opens the store: at once, as the first call's look does)
            _flush(sf)
    outcome = ExecutionOutcome(
        value=result.value, source=source, tool_name=call.tool_name, fingerprint=call.key,
        receipt=result.receipt, elapsed_ms=(time.perf_counter() - started) * 1000,
        takeover=result.takeover, dollars_saved=counters.get("dollars_saved", 0.0),
    )
    if call.session is not None:
        call.session.observe(outcome)
    return outcome


def _flush(sf: Singleflight) -> None:
    try:
        sf.flush_stats()
    except Exception as exc:  # counting must never fail a call whose tool has run
        sf._warn("flush", f"singleflight: statistics not written: {describe(exc)}")


def note_fallback(sf: Singleflight, call: Call, reason: str, topic: str = "") -> None:
    """Warn (once per tool and ``topic``) and count: the call runs its tool without sharing."""
    sf._warn(topic + call.tool_name,
             f"{call.tool_name}: executing without sharing because {reason}")
    sf._stats.add(call.tool_name, fallbacks=1)


def _count_usage(sf: Singleflight, call: Call, meter: Callable[[Any], tuple[int, int, float | None]],
                 result: Result, counters: dict[str, float]) -> None:
    """Tokens and dollars of the result (``options.meter``): spent if it ran, else saved."""
    try:
        tokens_in, tokens_out, dollars = _usage(meter(result.value))
    except Exception as exc:  # a report detail must never fail the call
        sf._warn(f"meter:{call.tool_name}", f"{call.tool_name}: its meter failed "
                 f"({type(exc).__name__}: {describe(exc)}); its tokens are not counted")
        return
    saved = result.source in _SAVED
    suffix = "_saved" if saved else ""
    counters["tokens_in" + suffix] = tokens_in
    counters["tokens_out" + suffix] = tokens_out
    if dollars is None:
        counters["unpriced"] = 1
    elif saved:
        counters["dollars_saved"] = counters.get("dollars_saved", 0.0) + dollars
    else:
        counters["dollars_spent"] = dollars
        if call.duplicate:
            counters["duplicate_dollars"] = dollars


def _usage(usage: object) -> tuple[int, int, float | None]:
    """What a meter returned, checked: it is added into the run's statistics for good."""
    if not isinstance(usage, tuple) or len(usage) != 3:
        raise ValueError(f"a meter returns (tokens_in, tokens_out, dollars), got {usage!r:.60}")
    tokens_in: Any = usage[0]
    tokens_out: Any = usage[1]
    dollars: Any = usage[2]
    for tokens in (tokens_in, tokens_out):
        if type(tokens) is not int or not 0 <= tokens < 10 ** 15:
            raise ValueError(f"token counts must be ints from 0, got {tokens!r:.40}")
    if dollars is not None and (type(dollars) not in (int, float) or not math.isfinite(dollars)
                                or not 0 <= dollars < 1e9):
        raise ValueError(f"dollars must be None or a number from 0, got {dollars!r:.40}")
    return tokens_in, tokens_out, dollars


def describe(exc: BaseException, limit: int = 300) -> str:
    try:
        text = str(exc)[:limit]
    except Exception:  # an exception whose __str__ fails is still reported
        return f"<{type(exc).__name__} whose str() failed>"
    return text.encode("utf-8", "backslashreplace").decode()


def owner_id(instance: str) -> str:
    return f"{host_name()}:{os.getpid()}:{instance}"


def flush_finally(store: ReceiptStore, stats: Stats, run_id: str, instance: str) -> None:
    """At exit or collection: one line if the counts cannot be written (the store is gone,
    the disk full), never a traceback."""
    try:
        flush_stats(store, stats, run_id, instance)
    except Exception as exc:
        with contextlib.suppress(Exception):  # stderr itself may be gone at exit
            print(f"singleflight: statistics not written at exit: {describe(exc)}",
                  file=sys.stderr)


def flush_stats(store: ReceiptStore, stats: Stats, run_id: str, instance: str) -> None:
    # One flush at a time: a summary's must find the counters written, also when a store
    # thread is writing them right now.
    with stats.flushing:
        counters = stats.snapshot()
        if counters:
            try:
                store.save_stats(run_id, owner_id(instance), counters)
            except BaseException:
                stats.dirty = True  # written next time
                raise
