"""Filling stores for bench/scale.py: N receipts of one tool, through the public API.

The first ``engine_calls`` receipts come from real calls of the decorated tool (misses: the
engine keys, runs, encodes, signs and stores them, and leaves a lease row behind each). The
rest are built the way the engine builds them (``_receipts._store``): the call's fingerprint
from ``fingerprint.make_fingerprint`` of the bound arguments, the output from
``codec.encode``, every other field copied from a receipt the engine wrote, signed with the
engine's ``Signer``, and added with ``store.import_receipts`` (one batch) when the store has
it, else ``store.import_receipt`` one by one. A sample of them is then called through the
decorated tool: every one must be a hit (the tool must not run), or the fill is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import diskcache
from common import open_engine, payload

from singleflight_agents import Singleflight, codec
from singleflight_agents.fingerprint import encode_inputs, make_fingerprint
from singleflight_agents.models import Receipt

TOOL_NAME = "bench.scale"
EXECUTIONS = [0]  # how many times the tool body ran, in this process


def scale_tool(x: int) -> dict[str, Any]:
    """The benchmarked tool: returns a small JSON-able value at once; counts its runs."""
    EXECUTIONS[0] += 1
    return payload(x)


def decorate(sf: Singleflight) -> Callable[[int], Any]:
    return sf.tool(deterministic=True, tool_name=TOOL_NAME)(scale_tool)


def progress(message: str) -> None:
    print(f"  [scale] {message}", file=sys.stderr, flush=True)


def _built(sf: Singleflight, template: Receipt, start: int, stop: int) -> Iterator[Receipt]:
    signer = sf._signer  # the engine's own: the key its hits verify against
    now = time.time()
    ttl = template.expires_at - template.created_at
    replace, sign = dataclasses.replace, signer.sign
    for i in range(start, stop):
        arguments = {"x": i}  # scale_tool's bound arguments, as the engine keys them
        inputs = encode_inputs(TOOL_NAME, arguments)
        kind, output = codec.encode(payload(i))
        yield sign(replace(
            template, fingerprint=make_fingerprint(TOOL_NAME, arguments), output=output,
            codec=kind, inputs=inputs if template.inputs is not None else None,
            inputs_sha256=hashlib.sha256(inputs.encode()).hexdigest(), created_at=now,
            expires_at=now + ttl, signature=""))


def fill_engine(sf: Singleflight, n: int, engine_calls: int, what: str) -> str:
    """Fill ``sf``'s store with receipts of ``scale_tool(0..n-1)``; how it was filled."""
    tool = decorate(sf)
    started = time.perf_counter()
    first = min(n, engine_calls)
    before = EXECUTIONS[0]
    for i in range(first):
        tool(i)
    if EXECUTIONS[0] - before != first:
        raise RuntimeError(f"{what}: the engine ran {EXECUTIONS[0] - before} of {first} calls")
    how = f"{first:,} engine calls"
    if n > first:
        template = sf.store.get(make_fingerprint(TOOL_NAME, {"x": 0}))
        if template is None:
            raise RuntimeError(f"{what}: make_fingerprint does not give the engine's key")
        batch = getattr(sf.store, "import_receipts", None)
        chunk = 50_000
        for start in range(first, n, chunk):
            receipts = _built(sf, template, start, min(n, start + chunk))
            if batch is not None:
                batch(receipts)
            else:
                for receipt in receipts:
                    sf.store.import_receipt(receipt)
            progress(f"{what}: {min(n, start + chunk):,}/{n:,} receipts "
                     f"({time.perf_counter() - started:.0f} s)")
        how += (f" + {n - first:,} receipts signed by the engine's Signer, added with "
                f"store.{'import_receipts (batched)' if batch else 'import_receipt (one by one)'}")
        sample = random.Random(n).sample(range(first, n), min(200, n - first))
        before = EXECUTIONS[0]
        for i in sample:
            if tool(i) != payload(i):
                raise RuntimeError(f"{what}: built receipt {i} served a wrong value")
        if EXECUTIONS[0] != before:
            raise RuntimeError(f"{what}: {EXECUTIONS[0] - before} of {len(sample)} built "
                               f"receipts were not hits")
    progress(f"{what}: {n:,} receipts in {time.perf_counter() - started:.1f} s ({how})")
    return how


def fill_diskcache(cache: diskcache.Cache, n: int) -> Callable[[int], Any]:
    """``cache.memoize()(payload)``, with ``payload(0..n-1)`` set in the cache under the
    keys the memoized function looks up."""
    func = cache.memoize()(payload)
    started = time.perf_counter()
    chunk = 10_000
    for start in range(0, n, chunk):
        with cache.transact():
            for i in range(start, min(n, start + chunk)):
                cache.set(func.__cache_key__(i), payload(i))
    hits_before = cache.stats(enable=True)[0]
    for i in random.Random(n).sample(range(n), min(200, n)):
        func(i)
    hits, misses = cache.stats(enable=False, reset=True)
    if hits - hits_before != min(200, n) or misses:
        raise RuntimeError(f"diskcache fill: {misses} misses in a sample of the stored keys")
    progress(f"diskcache: {n:,} entries in {time.perf_counter() - started:.1f} s (cache.set "
             f"in transactions of {chunk:,})")
    return func


def open_filled(url: str, n: int, engine_calls: int, what: str) -> tuple[Singleflight, str]:
    sf = open_engine(url)
    return sf, fill_engine(sf, n, engine_calls, what)
