"""singleflight-agents: one execution per identical tool call, shared by every caller.

The public names load on first use (PEP 562), so importing the package, as pytest does
for every registered plugin, costs next to nothing until the engine is needed.
"""

from __future__ import annotations

import importlib
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # "X as X": re-exported for type checkers
    from .engine import Singleflight as Singleflight
    from .fingerprint import make_fingerprint as make_fingerprint
    from .http_receipts import AsyncReceiptTransport as AsyncReceiptTransport
    from .http_receipts import ReceiptTransport as ReceiptTransport
    from .models import ExecutionOutcome as ExecutionOutcome
    from .models import Receipt as Receipt
    from .models import ReplayMissError as ReplayMissError
    from .models import SharedExecutionError as SharedExecutionError
    from .models import SingleflightError as SingleflightError
    from .models import Source as Source
    from .models import StoreError as StoreError
    from .models import ToolExecutionOptions as ToolExecutionOptions
    from .sessions import Scope as Scope
    from .sessions import Session as Session
    from .sessions import active_session as active_session
    from .sessions import session as session
    from .store import ReceiptStore as ReceiptStore
    from .store import open_store as open_store

__version__ = "0.1.0"
_HOMES = {
    "Singleflight": ".engine",
    "make_fingerprint": ".fingerprint",
    "ExecutionOutcome": ".models",
    "Receipt": ".models",
    "ReplayMissError": ".models",
    "SharedExecutionError": ".models",
    "SingleflightError": ".models",
    "Source": ".models",
    "StoreError": ".models",
    "ToolExecutionOptions": ".models",
    "Scope": ".sessions",
    "Session": ".sessions",
    "active_session": ".sessions",
    "session": ".sessions",
    "ReceiptStore": ".store",
    "ReceiptTransport": ".http_receipts",
    "AsyncReceiptTransport": ".http_receipts",
    "open_store": ".store",
}
__all__ = sorted(_HOMES)

if '"http": ["' in os.environ.get("SINGLEFLIGHT_SESSION", ""):
    # A parent's session routes HTTP hosts through receipts: so does this process, from
    # the moment it imports the package (sessions.py installs the routing).
    importlib.import_module(".sessions", __name__)


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
