"""Receipts of an engine's calls: read and checked, written and signed, and the lease given
back when a run fails; a result as each caller of its flight gets it, a copy of its own."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from . import codec
from ._accounting import UNSHAREABLE, describe
from ._call import Call, Result
from ._drive import Escaped
from .models import Receipt, Source, StoreError
from .store.base import Lease

if TYPE_CHECKING:
    from .engine import Singleflight

_VERIFIED_MAX = 4096


def lookup(sf: Singleflight, call: Call) -> Result | None:
    """The call's receipt as a result, if one is stored, trusted, current and decodable."""
    receipt = sf.store.get(call.key)
    if receipt is None or not _trusted(sf, call, receipt):
        return None
    mode = call.mode
    if mode != "replay" and receipt.expires_at <= time.time():
        return None
    max_age = call.options.max_age_seconds
    if max_age is not None and mode != "replay" and receipt.created_at < call.began - max_age:
        return None
    if mode == "refresh" and receipt.created_at < (
            sf.refresh_since if call.session is None else call.session.started):
        return None
    try:
        value = codec.decode(receipt.codec, receipt.output, call.options.allow_pickle)
    except Exception as exc:  # e.g. a pickled class that no longer imports: run again
        sf._warn(f"decode:{call.tool_name}", f"{call.tool_name}: a stored result could not "
                 f"be decoded ({type(exc).__name__}: {describe(exc)}); not served")
        return None
    return Result(value, Source.CACHE_HIT, receipt, (receipt.codec, receipt.output),
                  receipt.latency_ms)


def _trusted(sf: Singleflight, call: Call, receipt: Receipt) -> bool:
    # Each receipt is checked once: SQLite hands back the very object it read until the
    # file changes; Redis a new one, equal in every field to the one checked before.
    verified = sf._verified
    known = verified.get(call.key)
    if known is receipt:
        return True
    if known == receipt:
        verified[call.key] = receipt  # the store's own object: next time, found by identity
        return True
    signer = sf._signer
    try:
        valid = (receipt.fingerprint == call.key and receipt.key_id == signer.key_id
                 and signer.verify(receipt))
    except (TypeError, ValueError):  # fields of the wrong type: edited in the store
        valid = False
    if not valid:
        call.tampered = True
        then = "not served" if call.mode == "replay" else "re-executing"
        sf._warn(f"tampered:{call.tool_name}", f"{call.tool_name}: a stored receipt failed "
                 f"its signature check (tampered, or signed with another key); {then}")
        return False
    if len(verified) >= _VERIFIED_MAX:
        with contextlib.suppress(KeyError):  # another thread emptied it meanwhile
            verified.popitem(last=False)  # the oldest, in O(1) (a dict's first item is not)
    verified[call.key] = receipt
    return True


def single_use(value: Any) -> str | None:
    """Why ``value`` can be used only once (an awaitable, an iterator, a generator), or
    ``None``. Such a value is never stored nor handed to a second caller: the second
    ``await`` of a coroutine raises, and two callers iterating one generator each get part."""
    if inspect.isawaitable(value) or isinstance(value, Iterator | AsyncIterator):
        return f"its result (of type {type(value).__qualname__}) can be used only once"
    return None


def for_waiters(result: Result) -> Result | str:
    """What the owner's result lands as for the waiters of its flight, never the owner's own
    object: its encoded form, or a private copy (taken before the owner's caller can change
    it) that each waiter copies again; else why it cannot be shared."""
    if result.encoded is not None:
        return Result(None, result.source, result.receipt, result.encoded, result.latency_ms)
    why = single_use(result.value)
    if why is not None:
        return why
    try:
        private = copy.deepcopy(result.value)
    except Exception as exc:  # a lock, a socket, a C object without copy support
        return _uncopyable(result.value, exc)
    return Result(private, result.source, result.receipt, None, result.latency_ms)


def as_waiter(landed: Result) -> Result | str:
    """What a waiter of the flight gets: a copy of its own (decoded, like a cache hit, or
    copied), or why it cannot have one."""
    source = Source.CACHE_HIT if landed.source is Source.CACHE_HIT else Source.SHARED_WAIT
    try:
        if landed.encoded is not None:
            value = codec.decode(*landed.encoded, allow_pickle=True)
        else:
            value = copy.deepcopy(landed.value)
    except Exception as exc:
        return _uncopyable(landed.value, exc)
    return Result(value, source, landed.receipt, landed.encoded, landed.latency_ms)


def _uncopyable(value: Any, exc: Exception) -> str:
    return (f"its result (of type {type(value).__qualname__}) cannot be copied for another caller "
            f"({type(exc).__name__}: {describe(exc, 120)})")


def release_failed(sf: Singleflight, call: Call, lease: Lease, exc: BaseException) -> None:
    """Give the lease back after the tool raised ``exc`` (or its caller was cancelled)."""
    failure = None
    if isinstance(exc, Exception):  # not cancelled or interrupted: the tool failed
        sf._stats.add(call.tool_name, failures=1)
        error = exc.original if isinstance(exc, Escaped) else exc
        # A message may hold a secret ("401 for ?key=sk-..."): it is stored only when the
        # tool shares its failures, else the type alone.
        message = describe(error, 2000) if call.options.share_failures else ""
        failure = (type(error).__qualname__, message)
    with contextlib.suppress(Exception):  # the tool's error matters more
        sf.store.release(lease, failure)


def persist(sf: Singleflight, call: Call, result: Result, lease: Lease) -> None:
    """Store the receipt; on any failure, release the lease (waiters elsewhere must not
    wait it out) and warn: the result still reaches every caller of this flight."""
    single = None
    try:
        single = single_use(result.value)
        if single is None:
            _store(sf, call, result, lease)
            return
        why = f"{single}: it was not persisted, nor shared; each caller runs the tool itself"
    except Exception as exc:
        why = f"{_not_stored(call, exc)}; the result reached this call's waiters, but was " \
              f"not persisted"
    with contextlib.suppress(Exception):
        sf.store.release(lease)
    sf._stats.add(call.tool_name, not_persisted=1)
    # A single-use result's waiters would only repeat this line: same topic as theirs.
    sf._warn((UNSHAREABLE if single else "") + call.tool_name, f"{call.tool_name}: {why}")


def _not_stored(call: Call, exc: Exception) -> str:
    if isinstance(exc, codec.UnencodableError):
        return (f"result of type {exc.type_name} cannot be stored as JSON (return "
                f"JSON-able data" + (")" if call.options.allow_pickle else
                                     ", or pass allow_pickle=True)"))
    if isinstance(exc, StoreError):
        return f"the store failed: {exc}"
    # e.g. an int of 5,000 digits, a list nested 10,000 deep or holding itself
    return f"result cannot be stored ({type(exc).__name__}: {describe(exc)})"


def _store(sf: Singleflight, call: Call, result: Result, lease: Lease) -> None:
    options = call.options
    encoded = codec.encode(result.value, options.allow_pickle)
    if encoded[0] != codec.JSON:
        # Every waiter and every later caller decodes it: a pickle that does not load
        # back (a __reduce__ that raises) is neither stored nor decoded by waiters.
        codec.decode(*encoded, allow_pickle=True)
    result.encoded = encoded  # from here on, waiters decode their copies, stored or not
    now = time.time()
    signer = sf._signer
    receipt = signer.sign(Receipt(
        fingerprint=call.key, tool_name=call.tool_name, namespace=options.namespace,
        scope=options.scope, version=options.version,
        inputs=call.shown_inputs if options.store_inputs else None,
        inputs_sha256=hashlib.sha256(call.inputs.encode()).hexdigest(),
        codec=encoded[0], output=encoded[1], created_at=now,
        expires_at=now + options.ttl_seconds, latency_ms=round(result.latency_ms, 3),
        cost_usd=options.estimated_cost_usd, executor=sf._owner, token=lease.token,
        key_id=signer.key_id,
    ))
    if sf.store.put(receipt, lease):
        result.receipt = receipt
    else:
        sf._stats.add(call.tool_name, fenced_out=1)
        sf._warn(call.tool_name, f"{call.tool_name}: lease was taken over while the tool "
                 f"ran; the newer holder's receipt was kept")
