"""Data types shared by every layer: options, receipts, outcomes and errors."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class Source(enum.StrEnum):
    """Where an outcome's value came from."""

    EXECUTED = "executed"
    CACHE_HIT = "cache_hit"
    SHARED_WAIT = "shared_wait"
    EXECUTED_UNSHARED = "executed_unshared"
    EXECUTED_FALLBACK = "executed_fallback"


class SingleflightError(Exception):
    """Base class of the errors this library raises on purpose."""


class StoreError(SingleflightError):
    """The store cannot be opened or used; the message names the store and the fix."""


class ReplayMissError(SingleflightError):
    """Replay mode found no receipt for a call; the message names the tool, its arguments as
    they would be stored, and the command that records them."""

    def __init__(self, tool_name: str, inputs: str, record_command: str, *,
                 undeclared: bool = False, tampered: bool = False) -> None:
        shown = inputs if len(inputs) <= 300 else inputs[:297] + "..."
        if undeclared:
            message = (f"{tool_name}: declares no safety flag, so replay neither serves nor runs "
                       f"it; declare deterministic=True or bounded_read=True and record it "
                       f"with: {record_command}; or side_effecting=True to run it every time")
        else:
            message = (f"{tool_name}: no receipt to replay for arguments {shown}; record it "
                       f"with: {record_command}")
            if tampered:
                message += (" (a stored receipt failed its signature check: signed with another "
                            "key, or edited; check SINGLEFLIGHT_SECRET or the key file)")
        super().__init__(message)
        self.tool_name = tool_name
        self.inputs = inputs


MODES = ("record", "replay", "refresh", "off")
OPTION_ALIASES = {"ttl": "ttl_seconds", "cost": "estimated_cost_usd"}
RUN_SETTINGS = frozenset({"mode", "record_command"})  # once options, now the run's


def check_mode(mode: object, where: str = "mode") -> str:
    """``mode`` if it is one of :data:`MODES`, else a ``ValueError`` naming them."""
    if mode not in MODES:
        raise ValueError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode
MODEL_PREFIX = "model:"  # the tool names of model turns (the model wrappers, the report)


class SharedExecutionError(SingleflightError):
    """The execution another process ran for this call failed (``share_failures=True``)."""

    def __init__(self, tool_name: str, error_type: str, message: str) -> None:
        # Stores keep only the type: a message may hold a secret.
        detail = f": {message}" if message else " (its message stays with the process that ran it)"
        super().__init__(f"{tool_name}: shared execution failed with {error_type}{detail}")
        self.tool_name = tool_name
        self.error_type = error_type
        self.error_message = message


_DAY, _YEARS_10 = 86_400.0, 3650 * 86_400.0
# Past these bounds, clocks and stores overflow after the tool ran (an expiry in Redis
# milliseconds, a thread's wait), a lease lapses between two renewals (one every third of
# it), or a lease outlives the record Redis keeps of it (a day). Costs are summed per run:
# each must leave the sums finite, which every store can add up.
_NUMBERS: dict[str, tuple[Callable[[float], bool], str]] = {
    "ttl_seconds": (lambda v: 0 < v <= _YEARS_10,
                    "a positive number of seconds, at most 315360000 (10 years)"),
    "lease_seconds": (lambda v: 0.1 <= v <= _DAY,
                      "a positive number of seconds, from 0.1 to 86400 (a day)"),
    "wait_timeout_seconds": (lambda v: 0 < v <= _YEARS_10,
                             "a positive number of seconds, at most 315360000 (10 years)"),
    "estimated_cost_usd": (lambda v: 0 <= v <= 1e6, "a number of dollars from 0 to 1000000"),
    "max_age_seconds": (lambda v: 0 <= v <= _YEARS_10,
                        "None, or a number of seconds from 0 to 315360000 (10 years)"),
}


_FLAGS = ("deterministic", "bounded_read", "side_effecting", "share_failures", "allow_pickle",
          "store_inputs")


def check_text(value: object, where: str, fix: str = "pass plain text") -> str:
    """``value`` if it is a string that UTF-8 can encode (what every store keeps), else a
    one-line ``ValueError`` naming ``where``: a lone surrogate, as ``os.fsdecode`` makes of
    bytes that are not UTF-8, would fail only later, when the call is stored."""
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} {value!r} holds the lone surrogate {value[exc.start]!r} at "
                         f"index {exc.start}, which UTF-8 cannot encode; {fix}") from None
    return value


@dataclass(frozen=True, slots=True)
class ToolExecutionOptions:
    """How one tool is fingerprinted, shared and stored.

    A call is shared only when ``deterministic`` or ``bounded_read`` is true and
    ``side_effecting`` is false; ``side_effecting`` always wins. ``key`` replaces the
    arguments in the fingerprint with ``key(*args, **kwargs)``. ``allow_pickle`` lets
    results that JSON cannot carry be stored as pickle (loaded only after the signature
    verified). ``store_inputs=False`` keeps only a hash of the arguments in the receipt.

    A tool that declares none of the three flags is not shared: it runs on every call, like
    a side-effecting one, in the library, the plugin and every adapter. The mode (record,
    replay, refresh, off) is not an option of a tool: it belongs to the run (see
    :class:`~singleflight_agents.Session`). ``ttl`` and ``cost`` are accepted by
    :meth:`replace` (and so by ``sf.tool``, the marker and the fixture) as aliases of
    ``ttl_seconds`` and ``estimated_cost_usd``. ``redact`` keeps secrets out of the
    stored inputs: argument names (a keyword that ``**kwargs`` receives too) or dotted paths
    into dicts, dataclasses, named tuples and pydantic models (``"headers.Authorization"``,
    ``"cfg.api_key"``) whose values are stored as ``"[redacted]"``, or a function from the
    arguments to what to store; the fingerprint still covers the real values. With ``key``,
    each value a path leads to is masked wherever it shows in the stored key, also inside a
    longer string. A path that names no argument, or no field of an annotated record, is
    refused when the tool is declared; one that meets a record without the field, at the
    call. ``meter(result)`` returns what producing a result cost, ``(tokens_in,
    tokens_out, dollars)`` with ``dollars=None`` when unpriced: an execution counts it as
    spent, a receipt or a shared wait as saved (the model wrappers set it).
    ``max_age_seconds`` (default ``None``: up to ``ttl_seconds``) serves a receipt outside
    replay only if it was made at most that long before the call began: an older one runs
    again and is replaced, while it is still kept for ``ttl_seconds``, so replay serves it
    meanwhile. ``0`` runs every call that finds no receipt made since it began (calls in
    flight still share); what a listing that must reflect the server now wants.

    Names (``tool_name``, ``scope``, ``namespace``, ``version``) must be text UTF-8 can
    encode. ``ttl_seconds`` and ``wait_timeout_seconds`` are at most 10 years,
    ``lease_seconds`` from 0.1 s to a day, ``estimated_cost_usd`` from 0 to 1,000,000.
    """

    tool_name: str | None = None
    scope: str = "default"
    namespace: str = "default"
    version: str = "1"
    ttl_seconds: float = 3600.0
    max_age_seconds: float | None = None
    lease_seconds: float = 10.0
    wait_timeout_seconds: float = 300.0
    estimated_cost_usd: float = 0.0
    deterministic: bool = False
    bounded_read: bool = False
    side_effecting: bool = False
    share_failures: bool = False
    key: Callable[..., Any] | None = None
    allow_pickle: bool = False
    store_inputs: bool = True
    redact: Sequence[str] | Callable[[Any], Any] | None = None
    meter: Callable[[Any], tuple[int, int, float | None]] | None = None

    def __post_init__(self) -> None:
        for name, (in_range, bounds) in _NUMBERS.items():
            value = getattr(self, name)
            if value is None and name == "max_age_seconds":
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not in_range(value):
                raise ValueError(f"ToolExecutionOptions.{name} must be {bounds}, got {value!r}")
        if self.tool_name is not None:
            check_text(self.tool_name, "ToolExecutionOptions.tool_name")
        for name in ("scope", "namespace", "version"):
            check_text(getattr(self, name), f"ToolExecutionOptions.{name}")
        for name in _FLAGS:
            if type(getattr(self, name)) is not bool:  # "false" would be true
                raise ValueError(f"ToolExecutionOptions.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}")
        redact = self.redact
        if redact is not None and not callable(redact):
            if (isinstance(redact, str | bytes) or not isinstance(redact, Iterable)
                    or not all(isinstance(p, str) for p in redact)):
                raise ValueError("ToolExecutionOptions.redact takes a list of argument names or "
                                 "dotted paths, or a function of the arguments")
            for path in redact:
                if not all(path.split(".")):
                    raise ValueError(f"ToolExecutionOptions.redact: path {path!r} has an empty "
                                     f"part; join names with single dots, as in "
                                     f"'headers.Authorization'")
        if self.key is not None and not callable(self.key):
            raise ValueError("ToolExecutionOptions.key must be a callable taking the tool's arguments")
        if self.meter is not None and not callable(self.meter):
            raise ValueError("ToolExecutionOptions.meter must be a callable taking the tool's result")

    @property
    def shared(self) -> bool:
        return (self.deterministic or self.bounded_read) and not self.side_effecting

    def replace(self, **changes: Any) -> ToolExecutionOptions:
        """A copy with ``changes`` applied (``ttl=`` and ``cost=`` are aliases); unknown
        names raise ``TypeError``."""
        for alias, field in OPTION_ALIASES.items():
            if alias in changes:
                if field in changes:
                    raise TypeError(f"pass {alias}= or {field}=, not both")
                changes[field] = changes.pop(alias)
        for name in RUN_SETTINGS & set(changes):
            raise TypeError(f"{name}= is not a tool option: it belongs to the run; pass it to "
                            f"Singleflight({name}=...) or singleflight_agents.session({name}=...)"
                            + (" or use --singleflight-mode" if name == "mode" else ""))
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(
                f"unknown tool option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
                f" (aliases: ttl, cost)"
            )
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Receipt:
    """A signed record of one execution, as kept in the store.

    ``output`` is the encoded result (``codec`` says how), ``inputs`` the canonical
    JSON of the arguments, or ``None`` when inputs were not stored (``inputs_sha256``
    is always kept). Times are Unix seconds.
    """

    fingerprint: str
    tool_name: str
    namespace: str
    scope: str
    version: str
    inputs: str | None
    inputs_sha256: str
    codec: str
    output: str
    created_at: float
    expires_at: float
    latency_ms: float
    cost_usd: float
    executor: str
    token: int
    key_id: str
    signature: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The receipt's layout, defined once: the stores' columns and fields, the signed message and
# export/import all derive from the dataclass above.
RECEIPT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Receipt))
RECEIPT_NUMBERS: dict[str, type] = {f.name: {"float": float, "int": int}[str(f.type)]
                                    for f in dataclasses.fields(Receipt)
                                    if str(f.type) in ("float", "int")}


def receipt_row(receipt: Receipt) -> tuple[Any, ...]:
    """The receipt's fields in :data:`RECEIPT_FIELDS` order (``Receipt(*row)`` rebuilds it)."""
    return tuple(getattr(receipt, name) for name in RECEIPT_FIELDS)


@dataclass(frozen=True, slots=True)
class ExecutionOutcome:
    """What one call returned and how: ``source`` is a :class:`Source`."""

    value: Any
    source: Source
    tool_name: str
    fingerprint: str
    receipt: Receipt | None = None
    elapsed_ms: float = 0.0
    takeover: bool = False
    # What not running it saved: the tool's estimated cost, or the turn's priced tokens.
    dollars_saved: float = 0.0
