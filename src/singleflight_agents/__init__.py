"""singleflight-agents: one execution per identical tool call, shared by every caller."""

from .engine import Singleflight
from .fingerprint import make_fingerprint
from .models import (
    ExecutionOutcome,
    Receipt,
    SharedExecutionError,
    SingleflightError,
    Source,
    StoreError,
    ToolExecutionOptions,
)
from .store import ReceiptStore, open_store

__all__ = [
    "ExecutionOutcome",
    "Receipt",
    "ReceiptStore",
    "SharedExecutionError",
    "Singleflight",
    "SingleflightError",
    "Source",
    "StoreError",
    "ToolExecutionOptions",
    "make_fingerprint",
    "open_store",
]
__version__ = "0.1.0"
